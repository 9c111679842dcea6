"""A worker SIGKILLed mid-call, on a livekit-server cluster. What follows is livekit-server
1.13.5's behaviour, pinned here:

- the node sees the socket close and deregisters the worker at once: later calls go to the
  other workers;
- it never re-dispatches the dead worker's jobs, and ListDispatch never shows a terminal status
  for them: it reports the job as the room's node recorded it at assignment (JS_RUNNING, the
  dead worker's id) until the dispatch or the room is deleted (the worker's JS_SUCCESS or
  JS_FAILED only reaches the worker's own node, for every job, not only these);
- the room stays usable: a new dispatch into it runs on a live worker, and DeleteDispatch of the
  orphan is what ends it in ListDispatch.

callboard server (single node) does better and is pinned by tests/soak: the orphan becomes
JS_FAILED "disconnected and no MigrateJobRequest" after its migration grace.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import psutil
from livekit import api
from livekit.protocol import agent

from tests.cluster.cluster import Cluster
from tests.cluster.fleet import Caller, Fleet, outcome
from tests.interop.livekit_server import API_KEY, API_SECRET
from tests.interop.support import wait_until

START_TIMEOUT_S = 30.0
LISTED_TIMEOUT_S = 20.0
"""livekit-server lists a job in ListDispatch seconds after it was assigned."""
ORPHAN_EXIT_TIMEOUT_S = 15.0
"""Job processes of a killed worker exit on their own when its pings stop."""


async def listed_jobs(lk: api.LiveKitAPI, room: str) -> list[agent.Job]:
    return [j for d in await lk.agent_dispatch.list_dispatch(room) for j in d.state.jobs]


async def test_killed_worker_calls_stay_listed_as_assigned_and_the_rooms_stay_usable(
    cluster: Cluster, fleet: Fleet, caller: Caller
) -> None:
    fleet.max_jobs = 8
    workers = [fleet.start(f"w{i}", home=h) for i, h in enumerate((0, 1, 0))]
    for w in workers:
        await fleet.registered(w)
    calls = []
    for _ in range(6):
        calls.append(await caller.place(hold=None))
        await asyncio.sleep(0.3)
    first = await wait_until(
        lambda: (r := outcome(calls, fleet.records())).lost == 0 and r,
        "every call started",
        START_TIMEOUT_S,
        fleet.log_tails,
    )
    victim_label, _ = Counter(r["worker"] for r in first.started.values()).most_common(1)[0]
    victim = next(w for w in workers if w.label == victim_label)
    victim_id = victim.worker_id
    node = cluster.node_of(victim_id)
    assert node is not None
    on_victim = [c for c in calls if first.started[c.dispatch_id]["worker"] == victim_label]
    victim.remember_tree()
    job_pids = [int(first.started[c.dispatch_id]["pid"]) for c in on_victim]

    victim.signal(signal.SIGKILL)
    await asyncio.to_thread(victim.proc.wait, 10)
    await wait_until(
        lambda: any(r.get("workerID") == victim_id for r in node.log_records("closing worker")),
        "the node closed the killed worker",
        10,
        cluster.log_tails,
    )
    await wait_until(
        lambda: not any(psutil.pid_exists(p) and _alive(p) for p in job_pids),
        "the killed worker's job processes exited on their own",
        ORPHAN_EXIT_TIMEOUT_S,
    )

    async with api.LiveKitAPI(cluster.nodes[0].http_url, API_KEY, API_SECRET) as lk:
        for c in on_victim:
            jobs = await wait_until(
                lambda c=c: listed_jobs(lk, c.room), "job listed", LISTED_TIMEOUT_S
            )
            assert [(j.state.status, j.state.worker_id) for j in jobs] == [
                (agent.JS_RUNNING, victim_id)
            ], "livekit-server keeps the orphan as it was assigned"
        # the rooms stay usable: a new call into each runs on a live worker
        again = [await caller.place(hold=0.5, room=c.room) for c in on_victim]
        await asyncio.sleep(0)
        more = [await caller.place(hold=0.5) for _ in range(3)]
        second = await wait_until(
            lambda: (r := outcome(again + more, fleet.records())).lost == 0 and r,
            "the new calls started",
            START_TIMEOUT_S,
            fleet.log_tails,
        )
        assert victim_label not in {r["worker"] for r in second.started.values()}
        for c in on_victim:
            orphan = next(
                d for d in await lk.agent_dispatch.list_dispatch(c.room) if d.id == c.dispatch_id
            )
            await lk.agent_dispatch.delete_dispatch(orphan.id, c.room)
            left = [d.id for d in await lk.agent_dispatch.list_dispatch(c.room)]
            assert c.dispatch_id not in left, "DeleteDispatch ends the orphan"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
