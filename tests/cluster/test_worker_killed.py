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

callboard server (one node) does what the issue asks: the last test shows every call of a
killed worker reaching JS_FAILED in ListDispatch ("disconnected and no MigrateJobRequest", after
its migration grace).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
from livekit import api
from livekit.protocol import agent

from callboard.server.app import run_server
from callboard.server.config import ServerConfig
from tests.cluster.cluster import Cluster
from tests.cluster.fleet import AGENT_NAME, Call, Caller, Fleet
from tests.interop.livekit_server import API_KEY, API_SECRET
from tests.interop.support import wait_until

LISTED_TIMEOUT_S = 20.0
"""livekit-server lists a job in ListDispatch seconds after it was assigned."""
ORPHAN_EXIT_TIMEOUT_S = 15.0
"""Job processes of a killed worker exit on their own when its pings stop."""
MIGRATION_GRACE_HERE_S = 2.0
"""callboard server's migration grace in the last test (15 s by default): a killed worker
never sends MigrateJobRequest, so a longer grace would only be waited out."""


async def listed_jobs(lk: api.LiveKitAPI, room: str, dispatch_id: str = "") -> list[agent.Job]:
    """The jobs ListDispatch shows in `room` (of one dispatch, when given)."""
    dispatches = await lk.agent_dispatch.list_dispatch(room)
    return [j for d in dispatches if d.id == dispatch_id or not dispatch_id for j in d.state.jobs]


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
    first = await fleet.all_started(calls)
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
                lambda c=c: listed_jobs(lk, c.room, c.dispatch_id), "job listed", LISTED_TIMEOUT_S
            )
            assert [(j.state.status, j.state.worker_id) for j in jobs] == [
                (agent.JS_RUNNING, victim_id)
            ], "livekit-server keeps the orphan as it was assigned"
        # the rooms stay usable: a new call into each runs on a live worker
        again = [await caller.place(hold=0.5, room=c.room) for c in on_victim]
        await asyncio.sleep(0)
        more = [await caller.place(hold=0.5) for _ in range(3)]
        second = await fleet.all_started(again + more)
        assert victim_label not in {r["worker"] for r in second.started.values()}
        for c in on_victim:
            orphan = next(
                d for d in await lk.agent_dispatch.list_dispatch(c.room) if d.id == c.dispatch_id
            )
            await lk.agent_dispatch.delete_dispatch(orphan.id, c.room)
            left = [d.id for d in await lk.agent_dispatch.list_dispatch(c.room)]
            assert c.dispatch_id not in left, "DeleteDispatch ends the orphan"
    await fleet.reporting_settles([w for w in workers if w is not victim])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_on_callboard_server_a_killed_workers_calls_end_failed_in_list_dispatch(
    tmp_path: Path,
) -> None:
    config = ServerConfig(port=0, migration_grace=MIGRATION_GRACE_HERE_S)
    fleet = Fleet(None, tmp_path)
    async with run_server(config) as server:
        try:
            victim = fleet.start("solo", home=0, url=server.url)
            await fleet.registered(victim)
            victim_id = victim.worker_id
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                calls = []
                for n in range(3):
                    room = f"killed-{uuid.uuid4().hex[:6]}-{n}"
                    d = await lk.agent_dispatch.create_dispatch(
                        api.CreateAgentDispatchRequest(agent_name=AGENT_NAME, room=room)
                    )
                    calls.append(Call(room, 0, time.time(), d.id))
                await fleet.all_started(calls)
                victim.signal(signal.SIGKILL)
                await asyncio.to_thread(victim.proc.wait, 10)
                for c in calls:
                    jobs = await wait_until(
                        lambda c=c: _ended(lk, c),
                        f"{c.room}: the killed worker's job ended",
                        MIGRATION_GRACE_HERE_S + LISTED_TIMEOUT_S,
                        fleet.log_tails,
                    )
                    assert [(j.state.status, j.state.worker_id) for j in jobs] == [
                        (agent.JS_FAILED, victim_id)
                    ]
                    assert "disconnected and no MigrateJobRequest" in jobs[0].state.error
        finally:
            fleet.stop_all()


async def _ended(lk: api.LiveKitAPI, call: Call) -> list[agent.Job] | None:
    jobs = await listed_jobs(lk, call.room, call.dispatch_id)
    return jobs if jobs and all(j.state.status != agent.JS_RUNNING for j in jobs) else None
