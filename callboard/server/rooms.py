"""Rooms and their agent dispatches: LiveKit's RoomService and AgentDispatchService.

A room keeps its `Room` proto (sid, name, metadata, timeouts, ...) and its dispatches. Creating
a room dispatches the agents of its config, or, with none, the automatic dispatch (agent_name
"") as livekit-server does; every dispatch becomes a job through the dispatch engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from livekit.protocol import agent, agent_dispatch, models, room

from callboard.log import get_logger
from callboard.server.auth import Grants
from callboard.server.config import ROOM_DEPARTURE_TIMEOUT_S, ROOM_EMPTY_TIMEOUT_S
from callboard.server.dispatch import DispatchEngine
from callboard.server.ids import DISPATCH_PREFIX, ROOM_PREFIX, new_id
from callboard.server.twirp import TwirpError, TwirpRouter, require

log = get_logger("server.rooms")

ROOM_SERVICE = "livekit.RoomService"
DISPATCH_SERVICE = "livekit.AgentDispatchService"
MAX_ROOM_NAME = 256
MAX_METADATA = 64 * 1024
# What livekit-server lists in Room.enabled_codecs by default.
ENABLED_CODECS = (
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
)


ENDED = (agent.JS_SUCCESS, agent.JS_FAILED, agent.JS_CANCELLED)
ROOM_SWEEP_INTERVAL_S = 5.0


@dataclass(eq=False)
class RoomState:
    info: models.Room
    dispatches: dict[str, agent_dispatch.AgentDispatch] = field(default_factory=dict)

    def idle_since(self) -> float | None:
        """When the room's last job ended (or it was created); None while a job is live.

        The embedded server has no media participants, so a room is empty once its jobs end.
        """
        last = self.info.creation_time_ms / 1000
        for d in self.dispatches.values():
            for job in d.state.jobs:
                if job.state.status not in ENDED:
                    return None
                last = max(last, job.state.ended_at / 1e9)
        return last


def _check_room_name(name: str) -> None:
    if not name:
        raise TwirpError("invalid_argument", "room name is required")
    if len(name) > MAX_ROOM_NAME:
        raise TwirpError("invalid_argument", f"room name longer than {MAX_ROOM_NAME} characters")


def _check_metadata(metadata: str) -> None:
    if len(metadata.encode()) > MAX_METADATA:
        raise TwirpError("invalid_argument", f"metadata larger than {MAX_METADATA} bytes")


class RoomRegistry:
    """All rooms of this server, and the Twirp methods that manage them."""

    def __init__(self, engine: DispatchEngine) -> None:
        self._engine = engine
        self._rooms: dict[str, RoomState] = {}

    def install(self, router: TwirpRouter) -> None:
        router.add(ROOM_SERVICE, "CreateRoom", room.CreateRoomRequest, self.create_room)
        router.add(ROOM_SERVICE, "ListRooms", room.ListRoomsRequest, self.list_rooms)
        router.add(ROOM_SERVICE, "DeleteRoom", room.DeleteRoomRequest, self.delete_room)
        router.add(
            ROOM_SERVICE, "ListParticipants", room.ListParticipantsRequest, self.list_participants
        )
        router.add(
            DISPATCH_SERVICE,
            "CreateDispatch",
            agent_dispatch.CreateAgentDispatchRequest,
            self.create_dispatch,
        )
        router.add(
            DISPATCH_SERVICE,
            "DeleteDispatch",
            agent_dispatch.DeleteAgentDispatchRequest,
            self.delete_dispatch,
        )
        router.add(
            DISPATCH_SERVICE,
            "ListDispatch",
            agent_dispatch.ListAgentDispatchRequest,
            self.list_dispatch,
        )

    # -- RoomService --------------------------------------------------------------------------

    async def create_room(self, grants: Grants | None, req: room.CreateRoomRequest) -> models.Room:
        require(grants, "roomCreate")
        _check_room_name(req.name)
        _check_metadata(req.metadata)
        existing = self._rooms.get(req.name)
        if existing is not None:
            return existing.info
        self._open_room(req)
        return self._rooms[req.name].info

    def ensure_room(self, req: room.CreateRoomRequest) -> models.Room:
        """The room `req` names, opened with its config's dispatches if it does not exist yet
        (how a SIP call's dispatch rule creates the caller's room)."""
        existing = self._rooms.get(req.name)
        return (existing or self._open_room(req)).info

    def _open_room(self, req: room.CreateRoomRequest) -> RoomState:
        """Create the room and its dispatches: its config's agents, or the automatic one."""
        state = self._new_room(req)
        agents = list(req.agents) or [agent_dispatch.RoomAgentDispatch()]
        for spec in agents:
            self._add_dispatch(state, _new_dispatch(req.name, spec))
        return state

    def _new_room(self, req: room.CreateRoomRequest) -> RoomState:
        now = time.time()
        info = models.Room(
            sid=new_id(ROOM_PREFIX),
            name=req.name,
            empty_timeout=req.empty_timeout or ROOM_EMPTY_TIMEOUT_S,
            departure_timeout=req.departure_timeout or ROOM_DEPARTURE_TIMEOUT_S,
            max_participants=req.max_participants,
            creation_time=int(now),
            creation_time_ms=int(now * 1000),
            metadata=req.metadata,
            enabled_codecs=[models.Codec(mime=m) for m in ENABLED_CODECS],
        )
        state = RoomState(info)
        self._rooms[req.name] = state
        log.info("room created", extra={"room": req.name, "room_sid": info.sid})
        return state

    async def list_rooms(
        self, grants: Grants | None, req: room.ListRoomsRequest
    ) -> room.ListRoomsResponse:
        require(grants, "roomList")
        names = set(req.names)
        return room.ListRoomsResponse(
            rooms=[s.info for name, s in self._rooms.items() if not names or name in names]
        )

    async def delete_room(
        self, grants: Grants | None, req: room.DeleteRoomRequest
    ) -> room.DeleteRoomResponse:
        require(grants, "roomCreate")
        state = self._rooms.pop(req.room, None)
        if state is None:
            raise TwirpError("not_found", f"room {req.room!r} does not exist")
        for dispatch in state.dispatches.values():
            await self._terminate_jobs(dispatch, "room deleted", agent.JSR_ROOM_CLOSED)
        log.info("room deleted", extra={"room": req.room, "room_sid": state.info.sid})
        return room.DeleteRoomResponse()

    async def list_participants(
        self, grants: Grants | None, req: room.ListParticipantsRequest
    ) -> room.ListParticipantsResponse:
        require(grants, "roomAdmin", room=req.room)
        # livekit-server answers an empty list for a room that does not exist, not not_found.
        return room.ListParticipantsResponse()

    # -- AgentDispatchService -----------------------------------------------------------------

    async def create_dispatch(
        self, grants: Grants | None, req: agent_dispatch.CreateAgentDispatchRequest
    ) -> agent_dispatch.AgentDispatch:
        require(grants, "roomAdmin", room=req.room)
        _check_room_name(req.room)
        _check_metadata(req.metadata)
        state = self._rooms.get(req.room)
        if state is None:
            state = self._open_room(room.CreateRoomRequest(name=req.room))
        dispatch = _new_dispatch(req.room, req)
        self._add_dispatch(state, dispatch)
        answer = agent_dispatch.AgentDispatch()
        answer.CopyFrom(dispatch)
        # one turn of the loop: the job's offer goes out before this answer (which shows the
        # dispatch as created), since a worker waits for the offer and only the caller for this
        await asyncio.sleep(0)
        return answer

    def _add_dispatch(
        self, state: RoomState, dispatch: agent_dispatch.AgentDispatch
    ) -> agent_dispatch.AgentDispatch:
        dispatch.state.created_at = time.time_ns()
        state.dispatches[dispatch.id] = dispatch
        if log.isEnabledFor(logging.INFO):
            log.info(
                "dispatch created",
                extra={
                    "room": dispatch.room,
                    "dispatch_id": dispatch.id,
                    "agent_name": dispatch.agent_name,
                },
            )
        self._engine.launch(state.info, dispatch)
        return dispatch

    async def delete_dispatch(
        self, grants: Grants | None, req: agent_dispatch.DeleteAgentDispatchRequest
    ) -> agent_dispatch.AgentDispatch:
        require(grants, "roomAdmin", room=req.room)
        state = self._rooms.get(req.room)
        dispatch = state.dispatches.pop(req.dispatch_id, None) if state else None
        if dispatch is None:
            raise TwirpError("not_found", f"dispatch {req.dispatch_id!r} not found in {req.room!r}")
        dispatch.state.deleted_at = time.time_ns()
        await self._terminate_jobs(dispatch, "dispatch deleted", agent.JSR_DISPATCH_DELETED)
        log.info("dispatch deleted", extra={"room": req.room, "dispatch_id": req.dispatch_id})
        return dispatch

    async def list_dispatch(
        self, grants: Grants | None, req: agent_dispatch.ListAgentDispatchRequest
    ) -> agent_dispatch.ListAgentDispatchResponse:
        require(grants, "roomAdmin", room=req.room)
        state = self._rooms.get(req.room)
        dispatches = list(state.dispatches.values()) if state else []
        if req.dispatch_id:
            dispatches = [d for d in dispatches if d.id == req.dispatch_id]
        return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=dispatches)

    def close_empty_rooms(self, now: float) -> list[str]:
        """Drop rooms idle for longer than their empty_timeout (as livekit-server closes
        empty rooms), so a long-running server does not keep every room it ever saw."""
        closed = []
        for name, state in list(self._rooms.items()):
            since = state.idle_since()
            if since is not None and now - since > state.info.empty_timeout:
                del self._rooms[name]
                closed.append(name)
                log.info(
                    "room closed: empty past its empty_timeout",
                    extra={"room": name, "room_sid": state.info.sid},
                )
        return closed

    async def sweep_task(self, interval: float = ROOM_SWEEP_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval)
            self.close_empty_rooms(time.time())

    async def _terminate_jobs(
        self, dispatch: agent_dispatch.AgentDispatch, why: str, reason: int
    ) -> None:
        for job in dispatch.state.jobs:
            await self._engine.terminate(job.id, why, reason)


def _new_dispatch(
    room_name: str,
    spec: agent_dispatch.RoomAgentDispatch | agent_dispatch.CreateAgentDispatchRequest,
) -> agent_dispatch.AgentDispatch:
    """A new dispatch of `spec`'s agent to `room_name` (from a room's config or CreateDispatch)."""
    return agent_dispatch.AgentDispatch(
        id=new_id(DISPATCH_PREFIX),
        agent_name=spec.agent_name,
        room=room_name,
        metadata=spec.metadata,
        restart_policy=spec.restart_policy,
        deployment=spec.deployment,
        attributes=spec.attributes,
    )
