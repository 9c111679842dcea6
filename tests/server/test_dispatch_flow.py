"""The dispatch engine end to end over the real /agent protocol, with simulated workers."""

from __future__ import annotations

import asyncio
import time

from livekit import api
from livekit.protocol import agent

from callboard.server.app import EmbeddedServer
from callboard.simworker import SimWorker
from tests.conftest import API_KEY, API_SECRET


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_room_without_agents_goes_to_unnamed_worker(server: EmbeddedServer) -> None:
    sim = SimWorker(server.url, API_KEY, API_SECRET, job_seconds=None)
    await sim.start()
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name="call-_+56975231235_abc"))
        await wait_for(lambda: len(sim.jobs) == 1)
        (job,) = [j.job for j in sim.jobs.values()]
        assert job.room.name == "call-_+56975231235_abc"
        assert job.id.startswith("AJ_") and job.dispatch_id.startswith("AD_")
        (dispatch,) = await lk.agent_dispatch.list_dispatch("call-_+56975231235_abc")
        assert dispatch.state.jobs[0].state.status == agent.JS_RUNNING
        assert dispatch.state.jobs[0].state.worker_id == sim.worker_id
    await sim.aclose()


async def test_refusals_move_to_next_worker_and_all_refusing_fails(server: EmbeddedServer) -> None:
    refuser = SimWorker(server.url, API_KEY, API_SECRET, accept=lambda j: False)
    await refuser.start()
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name="r-refused"))
        await wait_for(lambda: refuser.offers == 1)
        await asyncio.sleep(0.05)
        (dispatch,) = await lk.agent_dispatch.list_dispatch("r-refused")
        state = dispatch.state.jobs[0].state
        assert state.status == agent.JS_FAILED
        assert "refused" in state.error
        assert state.reason == agent.JSR_NO_CAPACITY

        taker = SimWorker(server.url, API_KEY, API_SECRET, job_seconds=None)
        await taker.start()
        await lk.room.create_room(api.CreateRoomRequest(name="r-taken"))
        await wait_for(lambda: len(taker.jobs) == 1)
    await refuser.aclose()
    await taker.aclose()


async def test_job_with_no_worker_is_recorded_failed(server: EmbeddedServer) -> None:
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="nobody", room="r-empty")
        )
        (listed,) = [x for x in await lk.agent_dispatch.list_dispatch("r-empty") if x.id == d.id]
        assert listed.state.jobs[0].state.status == agent.JS_FAILED
        assert "no worker" in listed.state.jobs[0].state.error


async def test_delete_dispatch_terminates_running_job(server: EmbeddedServer) -> None:
    sim = SimWorker(server.url, API_KEY, API_SECRET, agent_name="named", job_seconds=None)
    await sim.start()
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="named", room="r-del", metadata="hi")
        )
        await wait_for(lambda: len(sim.jobs) == 1)
        (job,) = [j.job for j in sim.jobs.values()]
        assert job.metadata == "hi" and job.agent_name == "named"
        await lk.agent_dispatch.delete_dispatch(d.id, "r-del")
        await wait_for(lambda: sim.terminated == [job.id])
    await sim.aclose()


async def test_rooms_whose_jobs_ended_close_after_their_empty_timeout(
    server: EmbeddedServer,
) -> None:
    sim = SimWorker(server.url, API_KEY, API_SECRET, job_seconds=0.0)
    await sim.start()
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name="r-done", empty_timeout=1))
        await lk.room.create_room(api.CreateRoomRequest(name="r-live", empty_timeout=1))
        await wait_for(lambda: len(sim.finished) == 2)
        sim.job_seconds = None
        await lk.room.create_room(api.CreateRoomRequest(name="r-running", empty_timeout=1))
        await wait_for(lambda: len(sim.jobs) == 1)
        closed = server.rooms.close_empty_rooms(time.time() + 5)
        assert sorted(closed) == ["r-done", "r-live"]
        assert [r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms] == [
            "r-running"
        ]
    await sim.aclose()
