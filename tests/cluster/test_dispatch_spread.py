"""Where calls go on a multi-node livekit-server: rooms are placed on any node, and each job is
offered to the node whose workers report the most spare capacity, whichever node hosts the room
or took the API call. What decides it is livekit-server 1.13.5's own behaviour, pinned here:

- a room is placed by the node selector (`kind: any`, `sort_by: random` by default), not on the
  node that took the CreateDispatch;
- the job request is a psrpc call with affinity: every node with registered workers for the
  agent answers Σ max(0, 0.7 − load) over its AVAILABLE workers, and the highest answer within
  ~200 ms wins (a node whose workers are all FULL answers 0 and never wins); that node then
  picks one of its own workers at random, weighted by 1 − load.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.cluster.cluster import Cluster
from tests.cluster.fleet import Caller, Fleet

CALL_GAP_S = 0.3
"""Between calls: each worker's new load reaches the server before the next job is placed."""


async def test_calls_through_any_node_are_spread_by_load_over_workers_of_every_node(
    cluster: Cluster, fleet: Fleet, caller: Caller
) -> None:
    """4 workers (2 per node) reporting load = calls / 8: 12 calls placed through both nodes'
    APIs land on every worker, and rooms hosted on one node are served by workers registered
    on the other; each worker's /worker and /metrics match its calls.

    Headroom on purpose: near a node's capacity livekit-server can pick a node whose workers
    turned FULL meanwhile, and then drops the job ("no workers with sufficient capacity") rather
    than trying another node."""
    fleet.max_jobs = 8
    workers = [fleet.start(f"w{i}", home=i % 2) for i in range(4)]
    assert [(await fleet.registered(w)).index for w in workers] == [0, 1, 0, 1]
    calls = []
    for _ in range(12):
        calls.append(await caller.place(hold=None))
        await asyncio.sleep(CALL_GAP_S)
    result = await fleet.all_started(calls)
    per_worker = Counter(r["worker"] for r in result.started.values())
    assert set(per_worker) == {w.label for w in workers}, per_worker
    assert {c.node for c in calls} == {0, 1}, "calls went through both nodes' APIs"
    home = {w.label: i % 2 for i, w in enumerate(workers)}
    hosts = {c.room: cluster.room_node(c.room) for c in calls}
    assert {n.index for n in hosts.values() if n} == {0, 1}, "rooms were placed on both nodes"
    served_across = [
        c.room
        for c in calls
        if (n := hosts[c.room]) and n.index != home[result.started[c.dispatch_id]["worker"]]
    ]
    assert served_across, "a room hosted on one node was served by a worker of the other"
    await fleet.reporting_settles(workers)


async def test_the_node_with_more_spare_capacity_takes_every_job(
    cluster: Cluster, fleet: Fleet, caller: Caller
) -> None:
    """With loads that do not move (0, as the interop agents report), node 0's two workers
    answer 1.4 and node 1's one worker 0.7: livekit-server offers the jobs to node 0, whatever
    node hosts the room, and node 1's worker stays (nearly) idle (why a two-node test saw "jobs
    only on the room's node": it is the capacity sum, not the room). Nearly: the highest claim
    wins only among those that reach the caller within ~200 ms of the first, and on this busy
    machine one occasionally does not (seen: 1 of 6)."""
    fleet.max_jobs = 20  # far from the cap: only the reported loads decide
    workers = [fleet.start(f"w{i}", home=h, fixed_load=0.0) for i, h in enumerate((0, 0, 1))]
    assert [(await fleet.registered(w)).index for w in workers] == [0, 0, 1]
    calls = []
    for _ in range(9):
        calls.append(await caller.place(hold=None))
        await asyncio.sleep(CALL_GAP_S)
    result = await fleet.all_started(calls)
    per_worker = Counter(r["worker"] for r in result.started.values())
    assert per_worker["w2"] <= 1, f"node 1's worker took {per_worker['w2']} of 9 (1/3 if by worker)"
    hosts = {cluster.room_node(c.room) for c in calls}
    assert {n.index for n in hosts if n} == {0, 1}, "rooms were placed on both nodes"
