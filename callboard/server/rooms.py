"""Rooms and their agent dispatches: LiveKit's RoomService and AgentDispatchService.

A room keeps its `Room` proto (sid, name, metadata, timeouts, ...), its dispatches and its live
participants (`rtc.model.LiveRoom`). Creating a room, through Twirp or by a participant joining,
dispatches the agents of its config, or, with none, the automatic dispatch (agent_name "") as
livekit-server does; every dispatch becomes a JT_ROOM job through the dispatch engine, plus a
JT_PARTICIPANT job for each participant that joins and a JT_PUBLISHER job when one first
publishes (for workers registered for those types). An agent participant leaving ends its job;
a room closing (DeleteRoom, or idle past its empty/departure timeout) removes everyone and
terminates its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Final

from livekit.protocol import agent, agent_dispatch, models, room

from callboard.log import get_logger
from callboard.server.auth import Grants
from callboard.server.config import ROOM_DEPARTURE_TIMEOUT_S, ROOM_EMPTY_TIMEOUT_S
from callboard.server.dispatch import DispatchEngine
from callboard.server.ids import DISPATCH_PREFIX, ROOM_PREFIX, new_id
from callboard.server.rtc.model import LiveRoom, Participant
from callboard.server.rtc.speakers import UPDATE_INTERVAL_MS
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
ROOM_SWEEP_INTERVAL_S = 1.0
SPEAKER_UPDATE_S: Final = UPDATE_INTERVAL_MS / 1000
AGENT_LEFT_ERROR = "agent worker left the room"
AGENT_LEFT_GRACE_S = 5.0
"""A worker reports its job's end just after the agent leaves the room (the job's last act is
to disconnect): the job fails as AGENT_LEFT_ERROR only if no end is reported, and the agent
has not joined again, within this."""
DEPENDENT_KINDS = frozenset({models.ParticipantInfo.AGENT, models.ParticipantInfo.EGRESS})
"""Participants that do not keep a room open nor get jobs of their own (livekit's 'dependent')."""


@dataclass(eq=False)
class RoomState:
    info: models.Room
    live: LiveRoom
    dispatches: dict[str, agent_dispatch.AgentDispatch] = field(default_factory=dict)

    def live_jobs(self) -> list[agent.Job]:
        return [
            job
            for d in self.dispatches.values()
            for job in d.state.jobs
            if job.state.status not in ENDED
        ]

    def idle_for(self, now: float) -> tuple[float, int] | None:
        """How long the room has been idle and the timeout that applies; None while in use.

        Occupied by any participant that is not an agent. After someone joined and left, the
        departure timeout runs from the last leave; before, the empty timeout runs from the
        creation or the end of its last job (a job whose agent never joined keeps it open).
        """
        live = self.live
        if any(p.info.kind not in DEPENDENT_KINDS for p in live.participants.values()):
            return None
        if live.ever_joined and live.last_left_at is not None:
            return now - live.last_left_at, self.info.departure_timeout
        if live.participants or self.live_jobs():
            return None
        last = self.info.creation_time_ms / 1000
        for d in self.dispatches.values():
            for job in d.state.jobs:
                last = max(last, job.state.ended_at / 1e9)
        return now - last, self.info.empty_timeout


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
        for method, request_type, handler in (
            ("GetParticipant", room.RoomParticipantIdentity, self.get_participant),
            ("RemoveParticipant", room.RoomParticipantIdentity, self.remove_participant),
            ("UpdateParticipant", room.UpdateParticipantRequest, self.update_participant),
            ("MutePublishedTrack", room.MuteRoomTrackRequest, self.mute_published_track),
            ("SendData", room.SendDataRequest, self.send_data),
            ("UpdateRoomMetadata", room.UpdateRoomMetadataRequest, self.update_room_metadata),
        ):
            router.add(ROOM_SERVICE, method, request_type, handler)
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
        state = RoomState(info, LiveRoom(info, self))
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
        state = self._rooms.get(req.room)
        if state is None:
            raise TwirpError("not_found", f"room {req.room!r} does not exist")
        await self._close(state, models.ROOM_DELETED, "room deleted")
        return room.DeleteRoomResponse()

    async def _close(self, state: RoomState, reason: int, why: str) -> None:
        """Remove everyone, terminate every job, forget the room."""
        if self._rooms.get(state.info.name) is state:
            del self._rooms[state.info.name]
        state.live.close(reason)
        for dispatch in state.dispatches.values():
            await self._terminate_jobs(dispatch, why, agent.JSR_ROOM_CLOSED)
        log.info(f"room closed: {why}", extra={"room": state.info.name, "room_sid": state.info.sid})

    def live_room(self, name: str) -> LiveRoom:
        """The room a participant joins, created as CreateRoom would if it does not exist."""
        state = self._rooms.get(name)
        if state is None:
            state = self._open_room(room.CreateRoomRequest(name=name))
        return state.live

    async def list_participants(
        self, grants: Grants | None, req: room.ListParticipantsRequest
    ) -> room.ListParticipantsResponse:
        require(grants, "roomAdmin", room=req.room)
        # livekit-server answers an empty list for a room that does not exist, not not_found.
        state = self._rooms.get(req.room)
        people = state.live.participants.values() if state else []
        return room.ListParticipantsResponse(participants=[p.info for p in people])

    def _participant(self, grants: Grants | None, room_name: str, identity: str) -> Participant:
        require(grants, "roomAdmin", room=room_name)
        state = self._rooms.get(room_name)
        if state is None:
            raise TwirpError("not_found", f"room {room_name!r} does not exist")
        p = state.live.participants.get(identity)
        if p is None:
            raise TwirpError("not_found", f"participant {identity!r} is not in room {room_name!r}")
        return p

    async def get_participant(
        self, grants: Grants | None, req: room.RoomParticipantIdentity
    ) -> models.ParticipantInfo:
        return self._participant(grants, req.room, req.identity).info

    async def remove_participant(
        self, grants: Grants | None, req: room.RoomParticipantIdentity
    ) -> room.RemoveParticipantResponse:
        p = self._participant(grants, req.room, req.identity)
        self._rooms[req.room].live.remove(p, models.PARTICIPANT_REMOVED)
        return room.RemoveParticipantResponse()

    async def update_participant(
        self, grants: Grants | None, req: room.UpdateParticipantRequest
    ) -> models.ParticipantInfo:
        p = self._participant(grants, req.room, req.identity)
        _check_metadata(req.metadata)
        if req.metadata:
            p.info.metadata = req.metadata
        if req.name:
            p.info.name = req.name
        if req.HasField("permission"):
            p.info.permission.CopyFrom(req.permission)
        for key, value in req.attributes.items():
            if value:
                p.info.attributes[key] = value
            else:
                p.info.attributes.pop(key, None)
        self._rooms[req.room].live.update(p)
        return p.info

    async def update_room_metadata(
        self, grants: Grants | None, req: room.UpdateRoomMetadataRequest
    ) -> models.Room:
        require(grants, "roomAdmin", room=req.room)
        _check_metadata(req.metadata)
        state = self._rooms.get(req.room)
        if state is None:
            raise TwirpError("not_found", f"room {req.room!r} does not exist")
        state.live.set_metadata(req.metadata)
        return state.info

    async def mute_published_track(
        self, grants: Grants | None, req: room.MuteRoomTrackRequest
    ) -> room.MuteRoomTrackResponse:
        p = self._participant(grants, req.room, req.identity)
        track = self._rooms[req.room].live.set_muted(p, req.track_sid, req.muted)
        if track is None:
            raise TwirpError(
                "not_found", f"track {req.track_sid!r} is not published by {p.identity!r}"
            )
        return room.MuteRoomTrackResponse(track=track)

    async def send_data(
        self, grants: Grants | None, req: room.SendDataRequest
    ) -> room.SendDataResponse:
        require(grants, "roomAdmin", room=req.room)
        state = self._rooms.get(req.room)
        if state is None:
            raise TwirpError("not_found", f"room {req.room!r} does not exist")
        user = models.UserPacket(
            payload=req.data,
            destination_identities=req.destination_identities,
            topic=req.topic if req.HasField("topic") else None,
            nonce=req.nonce,
        )
        packet = models.DataPacket(
            kind=req.kind, user=user, destination_identities=req.destination_identities
        )
        state.live.send_data(None, packet, reliable=req.kind == models.DataPacket.RELIABLE)
        return room.SendDataResponse()

    # -- RoomHooks: jobs that follow participants ---------------------------------------------

    def participant_joined(self, live: LiveRoom, p: Participant) -> None:
        self._launch_for(live, p, agent.JT_PARTICIPANT)

    def first_publish(self, live: LiveRoom, p: Participant) -> None:
        self._launch_for(live, p, agent.JT_PUBLISHER)

    def _launch_for(self, live: LiveRoom, p: Participant, job_type: int) -> None:
        state = self._rooms.get(live.name)
        if state is None or p.info.kind in DEPENDENT_KINDS:
            return
        for dispatch in list(state.dispatches.values()):
            if self._engine.has_worker(dispatch.agent_name, job_type):
                self._engine.launch(state.info, dispatch, job_type, participant=p.info)

    def participant_left(self, live: LiveRoom, p: Participant) -> None:
        """An agent's participant leaving ends its job (JS_FAILED if still running), unless a
        new session of the same identity replaced it (as livekit-server's room.go skips a
        replaced session: the SDK's full reconnect)."""
        state = self._rooms.get(live.name)
        if state is None or live.closed or p.info.kind != models.ParticipantInfo.AGENT:
            return
        for job in state.live_jobs():
            if job.state.participant_identity == p.identity:
                asyncio.get_running_loop().call_later(
                    AGENT_LEFT_GRACE_S, self._agent_left, live, p.identity, job.id
                )

    def _agent_left(self, live: LiveRoom, identity: str, job_id: str) -> None:
        if not live.closed and identity in live.participants:
            log.info(
                "agent rejoined: its job goes on",
                extra={"room": live.name, "identity": identity, "job_id": job_id},
            )
            return
        terminate = self._engine.terminate(
            job_id, AGENT_LEFT_ERROR, agent.JSR_UNSPECIFIED, error=AGENT_LEFT_ERROR
        )
        asyncio.get_running_loop().create_task(terminate)

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
        """Close rooms idle past their empty or departure timeout (as livekit-server does), so
        a long-running server does not keep every room it ever saw."""
        closed = []
        for name, state in list(self._rooms.items()):
            idle = state.idle_for(now)
            if idle is not None and idle[0] >= idle[1]:
                closed.append(name)
                why = "empty past its timeout"
                asyncio.get_running_loop().create_task(self._close(state, models.ROOM_CLOSED, why))
                del self._rooms[name]
        return closed

    async def sweep_task(self, interval: float = ROOM_SWEEP_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval)
            self.close_empty_rooms(time.time())

    async def speakers_task(self, interval: float = SPEAKER_UPDATE_S) -> None:
        """Every room tells its members about active speakers, as livekit-server does."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for state in list(self._rooms.values()):
                state.live.update_speakers(now)

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
