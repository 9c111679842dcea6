"""The worker end to end against the embedded server, with real jobs on both executors:
register, automatic and named dispatch, statuses, termination, drain, the job cap.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from livekit.protocol import agent

from callboard import JobExecutorType, Worker, WorkerPermissions
from callboard.server.app import EmbeddedServer
from callboard.version import __version__
from callboard.worker.worker import WorkerState
from tests.worker.agents.jobs import script
from tests.worker.support import (
    EXECUTORS,
    GatedExecutor,
    control,
    fast_options,
    no_leftover_children,
    running_worker,
    server_worker,
    wait_until,
)

NAMED = "receptionist"
TERMINATION_PROMPT_S = 1.5
"""A terminated job must be gone well before any timeout of the stop ladder would matter."""


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_lifecycle_register_dispatch_terminate_drain(
    server: EmbeddedServer, executor: JobExecutorType
) -> None:
    perms = WorkerPermissions(can_publish=False, hidden=True)
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(fast_options(server, executor, agent_name="")) as auto,
        running_worker(
            fast_options(server, executor, agent_name=NAMED, permissions=perms)
        ) as named,
    ):
        # register, as the server sees it
        for worker, name, expected_perms in (
            (auto, "", WorkerPermissions()),
            (named, NAMED, perms),
        ):
            session = server_worker(server, worker.id)
            assert worker.id.startswith("AW_")
            assert session.job_type == agent.JT_ROOM
            assert session.agent_name == name
            assert session.version == __version__
            assert session.permissions == expected_perms.to_proto()
            assert session.permissions.agent
        await wait_until(lambda: auto.state == WorkerState.AVAILABLE, "auto to be available")

        # a room with no agents: automatic dispatch to the unnamed worker; runs until terminated
        await ctl.create_room("lobby")
        job = await ctl.wait_status("lobby", agent.JS_RUNNING)
        assert job.state.worker_id == auto.id and job.agent_name == ""
        await wait_until(lambda: len(auto.active_jobs) == 1, "the job to run on the worker")
        (active,) = auto.active_jobs
        assert active.info.job.id == job.id
        assert active.info.url == server.url
        assert active.info.token, "the assignment token reaches the job"
        if executor == JobExecutorType.PROCESS:
            assert active.handle.pid not in (None, os.getpid())
        (dispatch,) = await ctl.lk.agent_dispatch.list_dispatch("lobby")

        # JobTermination (DeleteDispatch) ends it promptly, successfully
        await ctl.lk.agent_dispatch.delete_dispatch(dispatch.id, "lobby")
        await wait_until(
            lambda: not auto.active_jobs, "the terminated job to end", TERMINATION_PROMPT_S
        )
        assert active.outcome is not None and active.outcome.status == agent.JS_SUCCESS

        # explicit dispatch to the named worker: RUNNING, then exactly one terminal status
        await ctl.dispatch("desk", NAMED, script(sleep=0.3))
        running = await ctl.wait_status("desk", agent.JS_RUNNING, agent_name=NAMED)
        assert running.state.worker_id == named.id
        assert running.state.participant_identity == f"agent-{running.id}"
        done = await ctl.wait_status("desk", agent.JS_SUCCESS, agent_name=NAMED)
        assert done.state.error == "" and done.state.ended_at > 0
        await asyncio.sleep(0.3)
        assert await ctl.job("desk", NAMED) == done, "the terminal status must not change again"

        # drain: FULL at once, new dispatches refused, the running job finishes
        await ctl.dispatch("late", NAMED, script(sleep=0.6))
        await ctl.wait_status("late", agent.JS_RUNNING, agent_name=NAMED)
        draining = asyncio.create_task(named.drain(5.0))
        session = server_worker(server, named.id)
        await wait_until(lambda: session.draining, "the server to see the drain", 1.0)
        assert session.status == agent.WS_FULL
        assert named.state == WorkerState.DRAINING
        await ctl.dispatch("refused", NAMED, script(sleep=0.1))
        refused = await ctl.wait_status("refused", agent.JS_FAILED, agent_name=NAMED)
        assert refused.state.error, "a refused dispatch says why"
        assert not draining.done(), "the drain waits for the running job"
        await asyncio.wait_for(draining, 5.0)
        late = await ctl.job("late", NAMED)
        assert late.state.status == agent.JS_SUCCESS


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_job_cap_rejects_a_burst_beyond_max_jobs(
    server: EmbeddedServer, executor: JobExecutorType
) -> None:
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(fast_options(server, executor, max_jobs=2, num_idle_processes=2)) as w,
    ):
        rooms = [f"burst-{i}" for i in range(5)]
        await asyncio.gather(*(ctl.create_room(r) for r in rooms))
        await wait_until(lambda: len(w.active_jobs) == 2, "two jobs running")
        ended = [
            await ctl.wait_job(r, lambda j: j.state.status != agent.JS_PENDING, "placed")
            for r in rooms
        ]
        running = [j for j in ended if j.state.status == agent.JS_RUNNING]
        failed = [j for j in ended if j.state.status == agent.JS_FAILED]
        assert len(running) == 2 and len(failed) == 3, [j.state for j in ended]
        assert all(j.state.worker_id == w.id for j in running)
        for j in failed:
            assert j.state.reason == agent.JSR_NO_CAPACITY
            assert "refused" in j.state.error
        await asyncio.sleep(0.3)
        assert len(w.active_jobs) == 2
        assert server_worker(server, w.id).status == agent.WS_FULL


async def test_job_cap_overflow_goes_to_a_second_worker(server: EmbeddedServer) -> None:
    async with (
        control(server) as ctl,
        running_worker(fast_options(server, max_jobs=2)) as capped,
        running_worker(fast_options(server, max_jobs=3)) as roomy,
    ):
        rooms = [f"spill-{i}" for i in range(5)]
        await asyncio.gather(*(ctl.create_room(r) for r in rooms))
        placed = [await ctl.wait_status(r, agent.JS_RUNNING) for r in rooms]
        by_worker = {w.id: 0 for w in (capped, roomy)}
        for j in placed:
            by_worker[j.state.worker_id] += 1
        assert by_worker == {capped.id: 2, roomy.id: 3}
        assert len(capped.active_jobs) == 2 and len(roomy.active_jobs) == 3


async def test_termination_of_a_job_still_launching_is_honoured(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """JobTermination between the assignment and the job's start: the job is stopped as soon
    as it has started, instead of running on unseen by the server."""
    gated = GatedExecutor()
    opts = fast_options(server, agent_name=NAMED)
    async with control(server) as ctl, running_worker(opts, executor=gated) as worker:
        dispatch = await ctl.dispatch("stop-early", NAMED, script(until=str(tmp_path / "never")))
        await asyncio.wait_for(gated.launching.wait(), 5.0)
        await ctl.lk.agent_dispatch.delete_dispatch(dispatch.id, "stop-early")
        gated.gate.set()
        await wait_until(lambda: len(gated.launched) == 1, "the job to start")
        outcome = await asyncio.wait_for(gated.launched[0].wait(), TERMINATION_PROMPT_S)
        assert outcome.ok
        await wait_until(lambda: not worker.active_jobs, "the worker to forget the job")


async def test_drain_waits_for_an_accepted_job_that_starts_during_the_drain(
    server: EmbeddedServer,
) -> None:
    """In-flight accepts finish: a job assigned before the drain and started during it runs
    to its end; the drain does not return (and the worker does not close) under it."""
    gated = GatedExecutor()
    opts = fast_options(server, agent_name=NAMED)
    async with control(server) as ctl, running_worker(opts, executor=gated) as worker:
        await ctl.dispatch("in-flight", NAMED, script(sleep=0.3))
        await asyncio.wait_for(gated.launching.wait(), 5.0)
        draining = asyncio.create_task(worker.drain(5.0))
        await asyncio.sleep(0.05)
        gated.gate.set()
        await asyncio.wait_for(draining, 5.0)
        assert not worker.active_jobs, "drain returned while the job was still running"
        done = await ctl.wait_status("in-flight", agent.JS_SUCCESS, agent_name=NAMED)
        assert done.state.error == ""


async def test_a_finished_job_stops_counting_as_load(server: EmbeddedServer) -> None:
    async with control(server) as ctl, running_worker(fast_options(server)) as worker:
        await ctl.create_room("short")
        (dispatch,) = await ctl.lk.agent_dispatch.list_dispatch("short")
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run")
        assert worker.load > 0.0, "a just-started job reserves load"
        await ctl.lk.agent_dispatch.delete_dispatch(dispatch.id, "short")
        await wait_until(lambda: not worker.active_jobs, "the job to end")
        assert worker.load == 0.0


async def test_second_shutdown_request_terminates_jobs_and_reports_them(
    server: EmbeddedServer,
) -> None:
    opts = fast_options(server, agent_name=NAMED, drain_timeout=30.0)
    async with control(server) as ctl:
        worker = Worker(opts)
        run = asyncio.create_task(worker.run())
        await wait_until(lambda: worker.registered, "the worker to register")
        await ctl.dispatch("endless", NAMED, script())
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run")
        worker.request_shutdown()
        await wait_until(lambda: worker.draining, "the drain")
        await asyncio.sleep(0.1)
        assert not run.done(), "a drain waits for the endless job"
        worker.request_shutdown(fast=True)
        await asyncio.wait_for(run, 5.0)
        assert worker.state == WorkerState.STOPPED
        job = await ctl.job("endless", NAMED)
        assert job.state.status == agent.JS_SUCCESS
