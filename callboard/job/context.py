"""What agent code sees: JobRequest (accept or reject an offer), JobProcess (the process a job
runs in, with prewarmed `userdata`) and JobContext (one running job). Names and signatures follow
livekit-agents so that agents port by changing one import.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from livekit.protocol import agent, models

from callboard.log import get_logger

if TYPE_CHECKING:
    from livekit import api, rtc

log = get_logger("job")

PARTICIPANT_DISCONNECT_MESSAGE: Final = "closing agent session due to participant disconnect"
DEFAULT_PARTICIPANT_KINDS: Final = (5, 3, 0)
"""rtc.ParticipantKind CONNECTOR, SIP, STANDARD (the rtc SDK's numbers: livekit.protocol's
ParticipantInfo.Kind has CONNECTOR = 7): whom `wait_for_participant` waits for by default, as in
livekit-agents; not other agents, egress or ingress."""


class JobExecutorType(Enum):
    PROCESS = "process"
    THREAD = "thread"


class AutoSubscribe(str, Enum):  # noqa: UP042 (str mixin as in livekit-agents)
    SUBSCRIBE_ALL = "subscribe_all"
    SUBSCRIBE_NONE = "subscribe_none"
    AUDIO_ONLY = "audio_only"
    VIDEO_ONLY = "video_only"


@dataclass
class JobAcceptArguments:
    name: str
    identity: str
    metadata: str
    attributes: dict[str, str] | None = None


@dataclass
class RunningJobInfo:
    """Everything a job process needs to run one job (sent over IPC to process executors)."""

    accept_arguments: JobAcceptArguments
    job: agent.Job
    url: str
    token: str
    worker_id: str
    received_at: float = 0.0
    accepted_at: float = 0.0
    assigned_at: float = 0.0


class JobProcess:
    """The process (or thread) that runs jobs; `userdata` holds what `prewarm_fnc` prepared."""

    def __init__(
        self,
        *,
        executor_type: JobExecutorType,
        user_arguments: Any | None = None,
        http_proxy: str | None = None,
    ) -> None:
        self._executor_type = executor_type
        self._userdata: dict[Any, Any] = {}
        self._user_arguments = user_arguments
        self._http_proxy = http_proxy

    @property
    def executor_type(self) -> JobExecutorType:
        return self._executor_type

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def userdata(self) -> dict[Any, Any]:
        return self._userdata

    @property
    def user_arguments(self) -> Any | None:
        return self._user_arguments

    @property
    def http_proxy(self) -> str | None:
        return self._http_proxy


class JobRequest:
    """An offered job: call `accept(...)` or `reject()` once from `request_fnc`."""

    def __init__(
        self,
        *,
        job: agent.Job,
        on_reject: Callable[[bool], Awaitable[None]],
        on_accept: Callable[[JobAcceptArguments], Awaitable[None]],
    ) -> None:
        self._job = job
        self._on_reject = on_reject
        self._on_accept = on_accept

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def job(self) -> agent.Job:
        return self._job

    @property
    def room(self) -> models.Room:
        return self._job.room

    @property
    def publisher(self) -> models.ParticipantInfo | None:
        return self._job.participant if self._job.HasField("participant") else None

    @property
    def agent_name(self) -> str:
        return self._job.agent_name

    async def reject(self, *, terminate: bool = False) -> None:
        """Decline; with `terminate=True` the server ends the job instead of offering it on."""
        await self._on_reject(terminate)

    async def accept(
        self,
        *,
        name: str = "",
        identity: str = "",
        metadata: str = "",
        attributes: dict[str, str] | None = None,
    ) -> None:
        """Accept; the job starts when the server's assignment arrives."""
        await self._on_accept(
            JobAcceptArguments(
                name=name,
                identity=identity or f"agent-{self.id}",
                metadata=metadata,
                attributes=attributes,
            )
        )


ShutdownCallback = Callable[[str], Coroutine[None, None, None]]


@dataclass
class _ShutdownState:
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class JobContext:
    """One running job: its `job` proto, `room`, `proc`, `api`, connection and shutdown."""

    def __init__(
        self,
        *,
        proc: JobProcess,
        info: RunningJobInfo,
        inference_executor: Any | None = None,
    ) -> None:
        self._proc = proc
        self._info = info
        self._inference_executor = inference_executor
        self._shutdown = _ShutdownState()
        self._shutdown_callbacks: list[ShutdownCallback] = []
        self._room: rtc.Room | None = None
        self._api: api.LiveKitAPI | None = None
        self._connected = False
        self._connect_lock = asyncio.Lock()
        self._linked_participant: str | None = None

    # -- what the job is ----------------------------------------------------------------------

    @property
    def job(self) -> agent.Job:
        return self._info.job

    @property
    def room_name(self) -> str:
        return self._info.job.room.name

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    @property
    def proc(self) -> JobProcess:
        return self._proc

    @property
    def info(self) -> RunningJobInfo:
        return self._info

    @property
    def inference_executor(self) -> Any:
        if self._inference_executor is None:
            raise RuntimeError("no inference executor: none was configured for this worker")
        return self._inference_executor

    @property
    def log_context_fields(self) -> dict[str, Any]:
        return {"job_id": self.job.id, "room": self.room_name, "pid": os.getpid()}

    @property
    def room(self) -> rtc.Room:
        """The job's room (an `rtc.Room`; connected by `connect()`)."""
        if self._room is None:
            from livekit import rtc

            self._room = rtc.Room()
        return self._room

    @property
    def api(self) -> api.LiveKitAPI:
        """A LiveKitAPI client for the job's server (credentials from the environment)."""
        if self._api is None:
            from livekit import api

            self._api = api.LiveKitAPI(self._info.url)
        return self._api

    # -- connection ---------------------------------------------------------------------------

    async def connect(
        self,
        *,
        auto_subscribe: AutoSubscribe = AutoSubscribe.SUBSCRIBE_ALL,
        rtc_config: Any | None = None,
    ) -> None:
        """Join the room with the assignment's url and token (once, even if called concurrently)."""
        async with self._connect_lock:
            if not self._connected:
                await self._connect(auto_subscribe, rtc_config)

    async def _connect(self, auto_subscribe: AutoSubscribe, rtc_config: Any | None) -> None:
        from livekit import rtc

        room = self.room
        options = rtc.RoomOptions(
            auto_subscribe=auto_subscribe == AutoSubscribe.SUBSCRIBE_ALL, rtc_config=rtc_config
        )
        await room.connect(self._info.url, self._info.token, options=options)
        self._connected = True
        _subscribe_by_kind(room, auto_subscribe)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("disconnected", self._on_room_disconnected)
        log.info("connected to room", extra=self.log_context_fields)

    async def wait_for_participant(
        self,
        *,
        identity: str | None = None,
        kind: Sequence[int] | int = DEFAULT_PARTICIPANT_KINDS,
    ) -> rtc.RemoteParticipant:
        """The first remote participant of `kind` (or the one with `identity`), waiting if
        needed. `kind`: an rtc.ParticipantKind or a list of them (callers, not other agents)."""
        if not self._connected:
            await self.connect()
        room = self.room
        kinds = [kind] if isinstance(kind, int) else list(kind)

        def wanted(p: rtc.RemoteParticipant) -> bool:
            return (identity is None or p.identity == identity) and p.kind in kinds

        for p in room.remote_participants.values():
            if wanted(p):
                self._linked_participant = self._linked_participant or p.identity
                return p
        fut: asyncio.Future[rtc.RemoteParticipant] = asyncio.get_running_loop().create_future()

        def on_join(p: rtc.RemoteParticipant) -> None:
            if not fut.done() and wanted(p):
                fut.set_result(p)

        room.on("participant_connected", on_join)
        try:
            p = await fut
        finally:
            room.off("participant_connected", on_join)
        self._linked_participant = self._linked_participant or p.identity
        return p

    def _on_participant_disconnected(self, p: rtc.RemoteParticipant) -> None:
        if self._linked_participant is None or p.identity != self._linked_participant:
            return
        reason = _disconnect_reason(p)
        log.info(
            PARTICIPANT_DISCONNECT_MESSAGE,
            extra={**self.log_context_fields, "participant": p.identity, "reason": reason},
        )
        self.shutdown(f"participant {p.identity} disconnected ({reason})")

    def _on_room_disconnected(self, *args: Any) -> None:
        self.shutdown("room disconnected")

    # -- shutdown -----------------------------------------------------------------------------

    def add_shutdown_callback(
        self,
        callback: Callable[[], Coroutine[None, None, None]]
        | Callable[[str], Coroutine[None, None, None]],
    ) -> None:
        """Run `callback` (optionally taking the reason) when the job shuts down."""
        params = [
            p
            for p in inspect.signature(callback).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if params:
            self._shutdown_callbacks.append(callback)  # type: ignore[arg-type]
            return
        no_arg = callback

        async def with_reason(_: str) -> None:
            await no_arg()  # type: ignore[call-arg]

        self._shutdown_callbacks.append(with_reason)

    def shutdown(self, reason: str = "user requested") -> None:
        """End the job: the entrypoint is cancelled if still running, then callbacks run."""
        if not self._shutdown.requested.is_set():
            self._shutdown.reason = reason
            self._shutdown.requested.set()

    @property
    def shutdown_requested(self) -> asyncio.Event:
        return self._shutdown.requested

    @property
    def shutdown_reason(self) -> str:
        return self._shutdown.reason

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def shutdown_callbacks(self) -> list[ShutdownCallback]:
        return list(self._shutdown_callbacks)

    async def aclose(self) -> None:
        """Leave the room and close the API client (after the shutdown callbacks)."""
        if self._room is not None and self._connected:
            await self._room.disconnect()
            self._connected = False
        if self._api is not None:
            await self._api.aclose()


def _subscribe_by_kind(room: rtc.Room, auto_subscribe: AutoSubscribe) -> None:
    """AUDIO_ONLY / VIDEO_ONLY: the room does not auto-subscribe; subscribe to the tracks of that
    kind, those already published and those to come (as livekit-agents does)."""
    from livekit import rtc

    wanted = {
        AutoSubscribe.AUDIO_ONLY: rtc.TrackKind.KIND_AUDIO,
        AutoSubscribe.VIDEO_ONLY: rtc.TrackKind.KIND_VIDEO,
    }.get(auto_subscribe)
    if wanted is None:
        return

    def subscribe(pub: rtc.RemoteTrackPublication, *_: Any) -> None:
        if pub.kind == wanted:
            pub.set_subscribed(True)

    for p in room.remote_participants.values():
        for pub in p.track_publications.values():
            subscribe(pub)
    room.on("track_published", subscribe)


def _disconnect_reason(p: Any) -> str:
    try:
        from livekit.protocol import models as m

        return str(m.DisconnectReason.Name(p.disconnect_reason))
    except Exception:
        return "UNKNOWN"
