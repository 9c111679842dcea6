"""Our worker against both servers: registration, dispatch through RoomService and
AgentDispatchService, termination and drain behave the same on callboard server and on the real
livekit-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.protocol import agent

from callboard import JobExecutorType, Worker, WorkerOptions
from tests.interop.agents import callboard_agents
from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess
from tests.interop.support import unique, wait_until

pytestmark = pytest.mark.interop

JOB_TIMEOUT_S = 20.0


class Records:
    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self, event: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [line for line in lines if line["event"] == event]

    def for_room(self, event: str, room: str) -> dict[str, Any] | None:
        return next((e for e in self.events(event) if e["room"] == room), None)


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Records:
    path = tmp_path / "records.jsonl"
    monkeypatch.setenv(callboard_agents.RECORD_ENV, str(path))
    return Records(path)


@asynccontextmanager
async def our_worker(
    server: ServerProcess, entry: Callable[..., Any], agent_name: str
) -> AsyncIterator[Worker]:
    worker = Worker(
        WorkerOptions(
            entrypoint_fnc=entry,
            job_executor_type=JobExecutorType.PROCESS,
            agent_name=agent_name,
            ws_url=server.ws_url,
            api_key=API_KEY,
            api_secret=API_SECRET,
            host="127.0.0.1",
            port=0,
            load_fnc=lambda: 0.0,
            num_idle_processes=1,
            shutdown_process_timeout=3.0,
            drain_timeout=15.0,
        )
    )
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.registered or run.done(), "registration", 15)
        assert worker.id.startswith("AW_")
        yield worker
    finally:
        await worker.aclose()
        await run


async def job_listed(lk: api.LiveKitAPI, room: str, dispatch_id: str) -> agent.Job | None:
    for d in await lk.agent_dispatch.list_dispatch(room):
        if d.id == dispatch_id and d.state.jobs:
            return d.state.jobs[0]
    return None


async def test_explicit_dispatch_runs_and_delete_dispatch_terminates(
    lk_server: ServerProcess, lk: api.LiveKitAPI, records: Records
) -> None:
    name = unique("cb-named")
    room = unique("call-explicit")
    async with our_worker(lk_server, callboard_agents.until_terminated, name) as worker:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=name, room=room, metadata="m1")
        )
        started = await wait_until(
            lambda: records.for_room("job", room), "job start", JOB_TIMEOUT_S
        )
        assert started["agent_name"] == name and started["metadata"] == "m1"
        job = await wait_until(lambda: job_listed(lk, room, d.id), "job listed", JOB_TIMEOUT_S)
        assert job.state.worker_id == worker.id
        await lk.agent_dispatch.delete_dispatch(d.id, room)
        stopped = await wait_until(
            lambda: records.for_room("shutdown", room), "termination", JOB_TIMEOUT_S
        )
        assert stopped["job_id"] == started["job_id"]
        await wait_until(lambda: not worker.active_jobs, "job end at the worker", JOB_TIMEOUT_S)


async def test_room_with_agents_in_its_config_dispatches_to_us(
    lk_server: ServerProcess, lk: api.LiveKitAPI, records: Records
) -> None:
    name = unique("cb-config")
    room = unique("call-config")
    async with our_worker(lk_server, callboard_agents.brief, name) as worker:
        await lk.room.create_room(
            api.CreateRoomRequest(name=room, agents=[api.RoomAgentDispatch(agent_name=name)])
        )
        await wait_until(lambda: records.for_room("done", room), "job to finish", JOB_TIMEOUT_S)
        await wait_until(lambda: not worker.active_jobs, "job end at the worker", JOB_TIMEOUT_S)


async def test_automatic_dispatch_and_drain(
    lk_server: ServerProcess, lk: api.LiveKitAPI, records: Records
) -> None:
    room = unique("call-auto")
    async with our_worker(lk_server, callboard_agents.brief, "") as worker:
        await lk.room.create_room(api.CreateRoomRequest(name=room))
        await wait_until(lambda: records.for_room("job", room), "job start", JOB_TIMEOUT_S)
        drain = asyncio.create_task(worker.drain(15.0))
        await wait_until(lambda: worker.draining, "draining", 5)
        late = unique("call-late")
        await lk.room.create_room(api.CreateRoomRequest(name=late))
        await drain
        assert records.for_room("done", room) is not None, "the running job finished"
        await asyncio.sleep(1.0)
        assert records.for_room("job", late) is None, "a draining worker takes no new job"
