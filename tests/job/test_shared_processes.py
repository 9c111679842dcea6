"""jobs_per_process > 1: several jobs in one supervised process, each with its own outcome, its
own stop and its own ids on its log lines; what concerns the whole process (a crash) fails the
jobs in it and no other, and a job that will not stop is failed without killing its
neighbours, in a process that then takes no new job."""

from __future__ import annotations

import asyncio
import logging

import pytest
from livekit import api
from livekit.protocol import agent

from callboard import Worker
from callboard.job.runner import JobOutcome
from callboard.server.app import EmbeddedServer
from tests.job import agents
from tests.job.support import api_client, job_state, process_worker, terminal_state, until


async def start_call(lk: api.LiveKitAPI, worker: Worker, room: str) -> int:
    """Create `room` (automatic dispatch) and return the pid of the process running its job."""
    await lk.room.create_room(api.CreateRoomRequest(name=room))
    await until(lambda: room in rooms_running(worker), f"the job of {room} to run")
    pid = rooms_running(worker)[room]
    assert pid is not None
    return pid


def rooms_running(worker: Worker) -> dict[str, int | None]:
    return {j.info.job.room.name: j.handle.pid for j in worker.active_jobs}


async def stop_call(lk: api.LiveKitAPI, worker: Worker, room: str) -> JobOutcome:
    """Delete `room`'s dispatch (the server terminates its job) and return the job's outcome."""
    (job,) = [j for j in worker.active_jobs if j.info.job.room.name == room]
    (d,) = await lk.agent_dispatch.list_dispatch(room)
    await lk.agent_dispatch.delete_dispatch(d.id, room)
    return await job.handle.wait()


async def still_running(lk: api.LiveKitAPI, room: str) -> bool:
    state = await job_state(lk, room)
    return state is not None and state.status == agent.JS_RUNNING


async def test_three_calls_share_a_process_and_each_ends_on_its_own(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        process_worker(
            server, agents.shares_a_process, jobs_per_process=3, num_idle_processes=1
        ) as worker,
        api_client(server) as lk,
    ):
        pids = [await start_call(lk, worker, f"call-shared-{i}") for i in range(2)]
        assert worker.executor.idle_count == 0, "the busy process's free place is the warm one"
        pids.append(await start_call(lk, worker, "call-shared-2"))
        await until(lambda: worker.executor.idle_count == 1, "an idle process once it is full")
        pids.append(await start_call(lk, worker, "call-shared-3"))
        assert pids[0] == pids[1] == pids[2], "three calls fit in one process"
        assert pids[3] != pids[0], "a full process takes no fourth"
        handle = worker.active_jobs[0].handle

        assert (await stop_call(lk, worker, "call-shared-0")).ok
        assert await still_running(lk, "call-shared-1")
        assert await still_running(lk, "call-shared-2")
        assert await start_call(lk, worker, "call-shared-4") == pids[0], "the freed place"

        rest = [f"call-shared-{i}" for i in range(1, 5)]
        outcomes = await asyncio.gather(*(stop_call(lk, worker, room) for room in rest))
        assert [o.status for o in outcomes] == [agent.JS_SUCCESS] * 4
        assert await handle.wait_exit() == 0  # type: ignore[attr-defined]
    said = [r for r in caplog.records if r.getMessage() == "job says hello"]
    assert sorted(getattr(r, "room", "") for r in said) == [f"call-shared-{i}" for i in range(5)]
    assert all(getattr(r, "job_id", "").startswith("AJ_") for r in said)


async def test_a_crash_fails_every_job_of_its_process_and_no_other(server: EmbeddedServer) -> None:
    async with (
        process_worker(
            server, agents.shares_a_process, jobs_per_process=2, num_idle_processes=1
        ) as worker,
        api_client(server) as lk,
    ):
        calm = await start_call(lk, worker, "call-calm")
        assert await start_call(lk, worker, "call-crash") == calm
        assert await start_call(lk, worker, "call-elsewhere") != calm
        states = [await terminal_state(lk, room) for room in ("call-calm", "call-crash")]
        assert [(s.status, s.error) for s in states] == [
            (agent.JS_FAILED, "job process exited with code 3")
        ] * 2
        assert await still_running(lk, "call-elsewhere")
        assert await start_call(lk, worker, "call-after") != calm
        for room in ("call-elsewhere", "call-after"):
            assert (await stop_call(lk, worker, room)).ok


async def test_a_job_that_will_not_stop_is_failed_without_killing_its_neighbour(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        process_worker(
            server,
            agents.shares_a_process,
            jobs_per_process=3,
            shutdown_process_timeout=1.0,
        ) as worker,
        api_client(server) as lk,
    ):
        shared = await start_call(lk, worker, "call-neighbour")
        assert await start_call(lk, worker, "call-stubborn") == shared
        handle = worker.active_jobs[0].handle

        outcome = await asyncio.wait_for(
            stop_call(lk, worker, "call-stubborn"), agents.STUBBORN_BLOCK_S
        )
        assert outcome.status == agent.JS_FAILED
        assert outcome.error.startswith("did not stop within 1s of shutdown"), outcome.error
        assert await start_call(lk, worker, "call-next") != shared, "it takes no new job"

        assert await still_running(lk, "call-neighbour")
        await until(lambda: bool(logged_late(caplog)), "the stubborn job to end late")
        assert (await stop_call(lk, worker, "call-neighbour")).ok
        assert await handle.wait_exit() == -9  # type: ignore[attr-defined]
        assert (await stop_call(lk, worker, "call-next")).ok
    logged = [r for r in caplog.records if r.getMessage().startswith("job did not stop")]
    assert logged and getattr(logged[0], "room", "") == "call-stubborn"
    assert getattr(logged_late(caplog)[0], "room", "") == "call-stubborn"


def logged_late(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("a job failed for not")]
