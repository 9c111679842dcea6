"""What agent code sees: JobRequest (accept or reject an offer), JobProcess (the process a job
runs in, with prewarmed `userdata`) and JobContext (one running job). Names and signatures follow
livekit-agents so that agents port by changing one import.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from livekit.protocol import agent, models

from callboard.job.runner import run_shutdown_callbacks
from callboard.log import get_logger

if TYPE_CHECKING:
    from livekit import api, rtc
    from livekit import api as lk_api  # the JobContext.api property shadows `api` in the class
    from livekit.api.access_token import Claims

log = get_logger("job")

PARTICIPANT_DISCONNECT_MESSAGE: Final = "closing agent session due to participant disconnect"
DEFAULT_PARTICIPANT_KINDS: Final = [5, 3, 0]
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
    fake_job: bool = False
    """A job that no server dispatched (livekit-agents' console); callboard never makes one."""


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

    async def reject(self, *, terminate: bool = True) -> None:
        """Decline; with `terminate=True` (the default, as in livekit-agents) the server ends
        the job instead of offering it to another worker."""
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
ParticipantEntrypoint = Callable[["JobContext", "rtc.RemoteParticipant"], Awaitable[None]]
NO_AGENT_SESSION: Final = (
    "no AgentSession in this job: AgentSession runs with livekit-agents' job context, which "
    "callboard uses when the agent imports livekit.agents (pip install 'callboard[agents]')"
)


@dataclass
class _ShutdownState:
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class JobContext:
    """One running job: its `job` proto, `room`, `proc`, `api`, connection and shutdown.

    Every public member of livekit-agents' JobContext is here with the same signature. An agent
    that imports livekit.agents gets livekit-agents' own JobContext instead (see
    callboard/job/agents_bridge), so AgentSession and the plugins find what they expect."""

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
        self._participant_entrypoints: list[tuple[ParticipantEntrypoint, Sequence[int] | int]] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._room: rtc.Room | None = None
        self._api: api.LiveKitAPI | None = None
        self._connected = False
        self._connect_lock = asyncio.Lock()
        self._linked_participant: str | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_fields: dict[str, Any] = {
            "job_id": info.job.id,
            "room": info.job.room.name,
            "pid": os.getpid(),
        }

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

    def is_fake_job(self) -> bool:
        return self._info.fake_job

    @property
    def inference_executor(self) -> Any:
        if self._inference_executor is None:
            raise RuntimeError("no inference executor: none was configured for this worker")
        return self._inference_executor

    @property
    def inference_headers(self) -> dict[str, str]:
        """Extra headers for LiveKit Inference requests (livekit-agents sets some only for
        simulations, which callboard does not run)."""
        return {}

    @property
    def log_context_fields(self) -> dict[str, Any]:
        """Fields added to this job's log records (job_id, room, pid; assignable)."""
        return self._log_fields

    @log_context_fields.setter
    def log_context_fields(self, fields: dict[str, Any]) -> None:
        self._log_fields = fields

    @property
    def job_fields(self) -> dict[str, Any]:
        """The ids the job engine logs with (whatever the agent did to log_context_fields)."""
        return {"job_id": self.job.id, "room": self.room_name, "pid": os.getpid()}

    @property
    def room(self) -> rtc.Room:
        """The job's room (an `rtc.Room`; connected by `connect()`)."""
        if self._room is None:
            from livekit import rtc

            self._room = rtc.Room()
        return self._room

    @property
    def agent(self) -> rtc.LocalParticipant:
        return self.room.local_participant

    @property
    def local_participant_identity(self) -> str:
        return self.token_claims().identity or self.room.local_participant.identity

    def token_claims(self) -> Claims:
        """The claims of the job's room token (not verified: the server issued it)."""
        from livekit import api

        return api.TokenVerifier().verify(self._info.token, verify_signature=False)

    @property
    def api(self) -> api.LiveKitAPI:
        """A LiveKitAPI client for the job's server (credentials from the environment)."""
        if self._api is None:
            from livekit import api

            self._api = api.LiveKitAPI(self._info.url)
        return self._api

    @property
    def session_directory(self) -> Path:
        """A per-job temporary directory, removed when the job ends."""
        if self._tempdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="callboard-job-")
        return Path(self._tempdir.name)

    # -- livekit-agents' session, recording and simulation hooks --------------------------------

    @property
    def primary_session(self) -> Any:
        raise RuntimeError(NO_AGENT_SESSION)

    def make_session_report(self, session: Any | None = None) -> Any:
        raise RuntimeError(NO_AGENT_SESSION)

    def init_recording(self, options: Any) -> None:
        """Recording goes to LiveKit Cloud's observability, which callboard has no link to: the
        options are checked as livekit-agents checks them, and nothing is recorded."""
        redaction = self.job.enable_redaction or options.get("redaction", False)
        if redaction and options.get("audio", True) and not options.get("transcript", True):
            raise ValueError("audio upload requires transcript upload when redaction is enabled")

    def simulation_context(self) -> Any | None:
        return None

    @property
    def tagger(self) -> Any:
        """livekit-agents' Tagger (tags and outcomes for LiveKit Cloud's session report)."""
        try:
            from livekit.agents.observability import Tagger
        except ImportError:
            raise RuntimeError(
                "ctx.tagger needs livekit-agents (pip install 'callboard[agents]')"
            ) from None
        if not hasattr(self, "_tagger"):
            self._tagger = Tagger()
        return self._tagger

    # -- connection ---------------------------------------------------------------------------

    async def connect(
        self,
        *,
        encryption: rtc.E2EEOptions | None = None,
        auto_subscribe: AutoSubscribe = AutoSubscribe.SUBSCRIBE_ALL,
        rtc_config: rtc.RtcConfiguration | None = None,
        single_peer_connection: bool | None = None,
        e2ee: rtc.E2EEOptions | None = None,
    ) -> None:
        """Join the room with the assignment's url and token (once, even if called concurrently).
        `e2ee` is the deprecated name of `encryption`."""
        from livekit import rtc

        options = rtc.RoomOptions(
            encryption=encryption or e2ee,
            auto_subscribe=auto_subscribe == AutoSubscribe.SUBSCRIBE_ALL,
            rtc_config=rtc_config,
            single_peer_connection=single_peer_connection,
        )
        async with self._connect_lock:
            if not self._connected:
                await self._connect(options, auto_subscribe)

    async def _connect(self, options: rtc.RoomOptions, auto_subscribe: AutoSubscribe) -> None:
        room = self.room
        await room.connect(self._info.url, self._info.token, options=options)
        self._connected = True
        _subscribe_by_kind(room, auto_subscribe)
        room.on("participant_connected", self._participant_available)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("disconnected", self._on_room_disconnected)
        for p in room.remote_participants.values():
            self._participant_available(p)
        log.info("connected to room", extra=self.job_fields)

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

        def wanted(p: rtc.RemoteParticipant) -> bool:
            return (identity is None or p.identity == identity) and _kind_matches(p, kind)

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

    def add_participant_entrypoint(
        self,
        entrypoint_fnc: ParticipantEntrypoint,
        *_: Any,
        kind: Sequence[int] | int = DEFAULT_PARTICIPANT_KINDS,
    ) -> None:
        """Run `entrypoint_fnc(ctx, participant)` for every participant of `kind` in the room,
        those already there and those to come."""
        if any(fn is entrypoint_fnc for fn, _ in self._participant_entrypoints):
            raise ValueError("entrypoints cannot be added more than once")
        self._participant_entrypoints.append((entrypoint_fnc, kind))

    def _participant_available(self, p: rtc.RemoteParticipant) -> None:
        for fn, kind in self._participant_entrypoints:
            if _kind_matches(p, kind):
                name = f"part-entry-{p.identity}-{getattr(fn, '__name__', 'fn')}"
                self._track(asyncio.ensure_future(fn(self, p)), name)

    def _on_participant_disconnected(self, p: rtc.RemoteParticipant) -> None:
        if self._linked_participant is None or p.identity != self._linked_participant:
            return
        reason = _disconnect_reason(p)
        log.info(
            PARTICIPANT_DISCONNECT_MESSAGE,
            extra={**self.job_fields, "participant": p.identity, "reason": reason},
        )
        self.shutdown(f"participant {p.identity} disconnected ({reason})")

    def _on_room_disconnected(self, *args: Any) -> None:
        self.shutdown("room disconnected")

    # -- server API shortcuts -----------------------------------------------------------------

    def delete_room(
        self, room_name: str | None = None
    ) -> asyncio.Future[lk_api.DeleteRoomResponse]:
        """Delete the room (this job's by default), which disconnects everyone in it."""
        from livekit import api

        async def delete() -> api.DeleteRoomResponse:
            try:
                req = api.DeleteRoomRequest(room=room_name or self.room_name)
                return await self.api.room.delete_room(req)
            except api.TwirpError as e:
                if e.code != api.TwirpErrorCode.NOT_FOUND:
                    fields = {**self.job_fields, "error": str(e)}
                    log.warning("deleting the room failed", extra=fields)
            return api.DeleteRoomResponse()

        return self._track(asyncio.ensure_future(delete()), "delete_room")

    def add_sip_participant(
        self,
        *,
        call_to: str,
        trunk_id: str,
        participant_identity: str,
        participant_name: str = "SIP-participant",
    ) -> asyncio.Future[lk_api.SIPParticipantInfo]:
        """Dial `call_to` through the outbound SIP trunk `trunk_id` into this room."""
        from livekit import api

        req = api.CreateSIPParticipantRequest(
            room_name=self.room_name,
            participant_identity=participant_identity,
            sip_trunk_id=trunk_id,
            sip_call_to=call_to,
            participant_name=participant_name,
        )
        return self._track(
            asyncio.ensure_future(self.api.sip.create_sip_participant(req)), "add_sip_participant"
        )

    def transfer_sip_participant(
        self,
        participant: rtc.RemoteParticipant | str,
        transfer_to: str,
        play_dialtone: bool = False,
    ) -> asyncio.Future[lk_api.SIPParticipantInfo]:
        """Transfer a SIP participant (or identity) of this room to `transfer_to`."""
        from livekit import api

        identity = participant if isinstance(participant, str) else participant.identity
        req = api.TransferSIPParticipantRequest(
            room_name=self.room_name,
            participant_identity=identity,
            transfer_to=transfer_to,
            play_dialtone=play_dialtone,
        )
        return self._track(
            asyncio.ensure_future(self.api.sip.transfer_sip_participant(req)),
            "transfer_sip_participant",
        )

    def _track(self, task: asyncio.Future[Any], name: str) -> asyncio.Future[Any]:
        """Keep a fire-and-forget task alive and log its failure if nobody awaits it."""
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    f"error in {name}", extra={**self.job_fields, "error": repr(t.exception())}
                )

        task.add_done_callback(done)
        return task

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

    @contextlib.asynccontextmanager
    async def job_scope(self) -> AsyncIterator[None]:
        """What surrounds the entrypoint and the shutdown (nothing for callboard's own)."""
        yield

    async def close_job(self, reason: str, timeout: float) -> None:
        """After the entrypoint: shutdown callbacks, then leave the room and close clients."""
        await run_shutdown_callbacks(self._shutdown_callbacks, reason, timeout, self.job_fields)
        for task in list(self._tasks):
            task.cancel()
        async with asyncio.timeout(timeout):
            await self.aclose()

    async def aclose(self) -> None:
        """Leave the room and close the API client (after the shutdown callbacks)."""
        if self._room is not None and self._connected:
            await self._room.disconnect()
            self._connected = False
        if self._api is not None:
            await self._api.aclose()
        if self._tempdir is not None:
            self._tempdir.cleanup()


def _kind_matches(p: rtc.RemoteParticipant, kind: Sequence[int] | int) -> bool:
    return p.kind == kind if isinstance(kind, int) else p.kind in kind


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
