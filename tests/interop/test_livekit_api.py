"""The official `livekit-api` client (protobuf Twirp) against both servers: RoomService and
AgentDispatchService, field by field. No agent worker is registered during these tests."""

from __future__ import annotations

import asyncio
import time
from typing import Final

import pytest
from livekit import api
from livekit.protocol import agent, agent_dispatch

from tests.interop.conftest import CALLBOARD, LIVEKIT_SERVER
from tests.interop.livekit_server import ServerProcess
from tests.interop.support import POLL_S, unique, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60, func_only=True)]

# What both servers list in Room.enabled_codecs by default.
ENABLED_CODECS: Final = [
    "audio/PCMU",
    "audio/PCMA",
    "audio/opus",
    "audio/red",
    "video/VP8",
    "video/H264",
    "video/VP9",
    "video/AV1",
    "video/H265",
    "video/rtx",
]
CLOCK_SLACK_S: Final = 60
# The real server offers a job ~200 ms after a dispatch; a job to no worker never shows up.
NO_JOB_WINDOW_S: Final = 2.0


def assert_recent(seconds: float) -> None:
    assert abs(seconds - time.time()) < CLOCK_SLACK_S, seconds


async def test_create_room_fields(lk: api.LiveKitAPI) -> None:
    name = unique("fields")
    room = await lk.room.create_room(api.CreateRoomRequest(name=name, metadata="room-md"))
    assert room.sid.startswith("RM_") and len(room.sid) == 15
    assert (room.name, room.metadata) == (name, "room-md")
    assert room.empty_timeout == 300
    assert room.departure_timeout == 20
    assert room.max_participants == 0
    assert (room.num_participants, room.num_publishers, room.active_recording) == (0, 0, False)
    assert_recent(room.creation_time)
    assert room.creation_time_ms // 1000 == room.creation_time
    assert [c.mime for c in room.enabled_codecs] == ENABLED_CODECS


async def test_create_room_keeps_the_requested_limits(lk: api.LiveKitAPI) -> None:
    room = await lk.room.create_room(
        api.CreateRoomRequest(
            name=unique("limits"), empty_timeout=7, departure_timeout=3, max_participants=4
        )
    )
    assert (room.empty_timeout, room.departure_timeout, room.max_participants) == (7, 3, 4)


async def test_create_room_again_returns_the_existing_room(lk: api.LiveKitAPI) -> None:
    name = unique("again")
    first = await lk.room.create_room(api.CreateRoomRequest(name=name, metadata="one"))
    second = await lk.room.create_room(api.CreateRoomRequest(name=name, metadata="two"))
    assert second.sid == first.sid
    assert second.metadata == "one"


async def test_list_rooms_all_and_by_name(lk: api.LiveKitAPI) -> None:
    a, b = unique("list-a"), unique("list-b")
    sid_a = (await lk.room.create_room(api.CreateRoomRequest(name=a))).sid
    await lk.room.create_room(api.CreateRoomRequest(name=b))
    every = {r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms}
    assert {a, b} <= every
    (only,) = (await lk.room.list_rooms(api.ListRoomsRequest(names=[a]))).rooms
    assert (only.name, only.sid) == (a, sid_a)
    missing = await lk.room.list_rooms(api.ListRoomsRequest(names=[unique("missing")]))
    assert list(missing.rooms) == []


async def test_delete_room(lk: api.LiveKitAPI) -> None:
    name = unique("delete")
    await lk.room.create_room(api.CreateRoomRequest(name=name))
    await lk.room.delete_room(api.DeleteRoomRequest(room=name))
    assert list((await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))).rooms) == []
    with pytest.raises(api.ServerError) as err:
        await lk.room.delete_room(api.DeleteRoomRequest(room=name))
    assert (err.value.status, err.value.code) == (404, "not_found")


async def test_list_participants_of_an_empty_or_missing_room_is_empty(lk: api.LiveKitAPI) -> None:
    name = unique("participants")
    await lk.room.create_room(api.CreateRoomRequest(name=name))
    for room in (name, unique("no-such-room")):
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
        assert list(listed.participants) == []


async def test_create_dispatch_fields(lk: api.LiveKitAPI, lk_server: ServerProcess) -> None:
    """CreateDispatch on a missing room creates the room and, besides the explicit dispatch,
    its automatic one (agent_name "")."""
    room = unique("dispatch")
    agent_name = unique("nobody")
    created = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata='{"a": 1}')
    )
    assert created.id.startswith("AD_") and len(created.id) == 15
    assert (created.agent_name, created.room, created.metadata) == (agent_name, room, '{"a": 1}')
    assert created.restart_policy == agent_dispatch.JRP_ON_FAILURE
    assert_recent(created.state.created_at / 1e9)
    assert created.state.deleted_at == 0
    if lk_server.kind == CALLBOARD:
        # callboard lists the job from the start, still pending.
        (job,) = created.state.jobs
        assert job.id.startswith("AJ_") and job.dispatch_id == created.id
        assert job.state.status == agent.JS_PENDING
    else:
        assert list(created.state.jobs) == []

    (listed_room,) = (await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))).rooms
    assert listed_room.sid.startswith("RM_")
    dispatches = await lk.agent_dispatch.list_dispatch(room)
    assert sorted(d.agent_name for d in dispatches) == sorted(["", agent_name])
    fetched = await lk.agent_dispatch.get_dispatch(created.id, room)
    assert fetched is not None
    assert (fetched.id, fetched.agent_name, fetched.metadata) == (
        created.id,
        agent_name,
        '{"a": 1}',
    )
    assert fetched.state.created_at == created.state.created_at


async def test_create_room_with_agents_lists_them_as_dispatches(lk: api.LiveKitAPI) -> None:
    room = unique("room-agents")
    names = [unique("agent-a"), unique("agent-b")]
    await lk.room.create_room(
        api.CreateRoomRequest(
            name=room,
            agents=[api.RoomAgentDispatch(agent_name=n, metadata=f"md-{n}") for n in names],
        )
    )
    dispatches = await lk.agent_dispatch.list_dispatch(room)
    assert sorted((d.agent_name, d.metadata) for d in dispatches) == [
        (n, f"md-{n}") for n in sorted(names)
    ]
    assert all(d.id.startswith("AD_") and d.room == room for d in dispatches)


async def test_delete_dispatch(lk: api.LiveKitAPI, lk_server: ServerProcess) -> None:
    room = unique("delete-dispatch")
    agent_name = unique("nobody")
    created = await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata="md")
    )
    deleted = await lk.agent_dispatch.delete_dispatch(created.id, room)
    assert (deleted.id, deleted.agent_name, deleted.metadata) == (created.id, agent_name, "md")
    if lk_server.kind == CALLBOARD:
        assert_recent(deleted.state.deleted_at / 1e9)
    else:
        # The real server returns the dispatch as it was, without deleted_at.
        assert deleted.state.deleted_at == 0
    assert [d.agent_name for d in await lk.agent_dispatch.list_dispatch(room)] == [""]
    assert await lk.agent_dispatch.get_dispatch(created.id, room) is None
    with pytest.raises(api.ServerError) as err:
        await lk.agent_dispatch.delete_dispatch(created.id, room)
    assert (err.value.status, err.value.code) == (404, "not_found")


async def test_dispatch_with_no_worker(lk: api.LiveKitAPI, lk_server: ServerProcess) -> None:
    """Pinned difference. With no worker for a dispatch's agent (here, none for the explicit
    agent nor for the automatic dispatch of the room), the real server silently dispatches
    nothing: the dispatch stays listed without a job. callboard records a failed job
    (JS_FAILED, JSR_NO_CAPACITY) with the reason in its error."""
    room = unique("no-worker")
    agent_name = unique("nobody")
    await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=agent_name, room=room)
    )
    if lk_server.kind == LIVEKIT_SERVER:
        deadline = time.monotonic() + NO_JOB_WINDOW_S
        while time.monotonic() < deadline:
            dispatches = await lk.agent_dispatch.list_dispatch(room)
            assert len(dispatches) == 2
            assert all(list(d.state.jobs) == [] for d in dispatches), dispatches
            await asyncio.sleep(POLL_S)
        return

    async def failed() -> list[agent.Job] | None:
        jobs = [j for d in await lk.agent_dispatch.list_dispatch(room) for j in d.state.jobs]
        ended = [j for j in jobs if j.state.status == agent.JS_FAILED]
        return ended if len(ended) == 2 else None

    jobs = await wait_until(failed, "both jobs recorded as failed", 5.0)
    for job in jobs:
        assert job.state.reason == agent.JSR_NO_CAPACITY
        assert repr(job.agent_name) in job.state.error
        assert job.state.ended_at > 0
