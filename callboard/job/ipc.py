"""Framed, typed messages between the worker, the zygote and job processes. No domain logic.

A frame is a 4-byte big-endian length, a 1-byte message id and a pickled tuple of the message's
fields. Each message type is a frozen dataclass registered under a stable id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, TypeVar

from livekit.protocol import agent

from callboard.job.context import RunningJobInfo

HEADER: Final = struct.Struct(">IB")
MAX_FRAME: Final = 64 << 20


class IpcError(Exception):
    """A malformed or unknown frame."""


_REGISTRY: dict[int, type[Message]] = {}
M = TypeVar("M", bound="Message")


class Message:
    """Base of every IPC message; subclasses are frozen dataclasses with a unique `ID`."""

    ID: ClassVar[int]


def register(msg_id: int) -> Callable[[type[M]], type[M]]:
    """Class decorator: register a message dataclass under its stable `msg_id`."""

    def wrap(cls: type[M]) -> type[M]:
        if msg_id in _REGISTRY:
            raise ValueError(f"IPC message id {msg_id} used twice")
        cls.ID = msg_id
        _REGISTRY[msg_id] = cls
        return cls

    return wrap


# -- worker <-> job process --------------------------------------------------------------------


@register(1)
@dataclass(frozen=True)
class Initialized(Message):
    """The process ran prewarm_fnc (error is set if it raised) and is ready for a job."""

    pid: int
    error: str = ""


@register(2)
@dataclass(frozen=True)
class StartJob(Message):
    """A RunningJobInfo with its Job proto serialized (upb messages do not pickle)."""

    info: RunningJobInfo
    job: bytes

    @classmethod
    def of(cls, info: RunningJobInfo) -> StartJob:
        return cls(dataclasses.replace(info, job=None), info.job.SerializeToString())  # type: ignore[arg-type]

    def running_info(self) -> RunningJobInfo:
        return dataclasses.replace(self.info, job=agent.Job.FromString(self.job))


@register(3)
@dataclass(frozen=True)
class Ping(Message):
    timestamp: float


@register(4)
@dataclass(frozen=True)
class Pong(Message):
    last_timestamp: float
    timestamp: float


@register(5)
@dataclass(frozen=True)
class Shutdown(Message):
    """Stop job `job_id`, or every job of the process when it is empty."""

    reason: str
    job_id: str = ""


@register(6)
@dataclass(frozen=True)
class JobDone(Message):
    """Job `job_id`'s outcome; a process whose last job is done exits once the worker hangs
    up."""

    status: int
    error: str = ""
    job_id: str = ""


@register(8)
@dataclass(frozen=True)
class JobEnding(Message):
    """Job `job_id`'s outcome, known before it leaves its room and runs its shutdown callbacks:
    the worker reports it to the server at once (livekit-server fails a job whose agent leaves
    the room first). JobDone follows once the job has closed."""

    status: int
    error: str = ""
    job_id: str = ""


@register(7)
@dataclass(frozen=True)
class LogRecordMsg(Message):
    level: int
    logger: str
    message: str
    extra: dict[str, Any]
    exc_text: str = ""


# -- worker <-> zygote -------------------------------------------------------------------------


@register(20)
@dataclass(frozen=True)
class ZygoteConfig(Message):
    """What the zygote imports and what its children run."""

    entrypoint: tuple[str, str, str]
    """(module name, file path or "", qualname)"""
    prewarm: tuple[str, str, str] | None
    preload: tuple[str, ...]
    sys_path: tuple[str, ...]
    log_level: int
    shutdown_timeout: float
    start_method: str = "fork"
    """"fork" (from the zygote, milliseconds) or "spawn" (a fresh interpreter per process)."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables set for the zygote and every process it starts."""


@register(21)
@dataclass(frozen=True)
class ZygoteReady(Message):
    pid: int
    error: str = ""
    inference_methods: tuple[str, ...] = ()
    preload_failures: tuple[str, ...] = ()
    """Before-fork hooks that failed (callboard.job.preload): job processes do that work."""


FORK_JOB: Final = "job"
FORK_INFERENCE: Final = "inference"


@register(22)
@dataclass(frozen=True)
class ForkRequest(Message):
    token: int
    kind: str = FORK_JOB
    warm: bool = False
    """For the warm pool: the job process rehearses a job start before it reports ready."""


@register(23)
@dataclass(frozen=True)
class Forked(Message):
    """Sent with the worker's end of the new process's socket as ancillary data."""

    token: int
    pid: int


@register(24)
@dataclass(frozen=True)
class ChildExited(Message):
    pid: int
    returncode: int
    """Exit code, or minus the signal number (like subprocess)."""


# -- job process <-> inference process --------------------------------------------------------


@register(30)
@dataclass(frozen=True)
class InferenceRequest(Message):
    request_id: int
    method: str
    data: bytes


@register(31)
@dataclass(frozen=True)
class InferenceResponse(Message):
    request_id: int
    data: bytes | None
    error: str = ""


# -- encoding ----------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    body = pickle.dumps(astuple_shallow(msg), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body) + 1, msg.ID) + body


def decode_body(msg_id: int, body: bytes) -> Message:
    cls = _REGISTRY.get(msg_id)
    if cls is None:
        raise IpcError(f"unknown IPC message id {msg_id}")
    try:
        values = pickle.loads(body)
        return cls(*values)
    except Exception as e:
        raise IpcError(f"malformed {cls.__name__} frame: {e!r}") from None


def decode(frame: bytes) -> Message:
    """A whole frame (header included), as sent over a SOCK_SEQPACKET socket."""
    if len(frame) < HEADER.size:
        raise IpcError("truncated IPC frame")
    length, msg_id = HEADER.unpack_from(frame)
    if length != len(frame) - HEADER.size + 1:
        raise IpcError("IPC frame length does not match its header")
    return decode_body(msg_id, frame[HEADER.size :])


def astuple_shallow(msg: Message) -> tuple[Any, ...]:
    """Field values without astuple's deep copy (protobufs and dataclasses stay as they are)."""
    return tuple(getattr(msg, f.name) for f in fields(msg))  # type: ignore[arg-type]


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message of a stream; None at EOF, or when the connection broke between frames
    (the peer closed with frames of ours unread, or a write of ours found it gone: a hang-up
    all the same)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise IpcError("truncated IPC frame header") from None
    except (ConnectionResetError, BrokenPipeError):
        return None
    length, msg_id = HEADER.unpack(header)
    if not 1 <= length <= MAX_FRAME:
        raise IpcError(f"IPC frame of {length} bytes is out of bounds")
    try:
        body = await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        raise IpcError("truncated IPC frame body") from None
    return decode_body(msg_id, body)


class FrameProtocol(asyncio.Protocol):
    """Delivers each complete frame as it arrives, then EOF once.

    Unlike StreamReader, frames already received are never lost to a connection reset (a peer
    that exits with unread pings in its socket resets the connection right after its last frame).
    """

    def __init__(
        self, on_message: Callable[[Message], None], on_close: Callable[[Exception | None], None]
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            length, msg_id = HEADER.unpack_from(self._buf)
            if not 1 <= length <= MAX_FRAME:
                self._fail(IpcError(f"IPC frame of {length} bytes is out of bounds"))
                return
            end = HEADER.size + length - 1
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            try:
                msg = decode_body(msg_id, body)
            except IpcError as e:
                self._fail(e)
                return
            self._on_message(msg)

    def _fail(self, error: IpcError) -> None:
        if self.transport is not None:
            self.transport.close()
        self._on_close(error)
        self._on_close = lambda _e: None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_close(None)

    def send(self, msg: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(msg))


def send_blocking(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    """Send one message on a blocking socket, optionally with file descriptors attached."""
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_stream_blocking(sock: socket.socket) -> Message | None:
    """One message from a blocking stream socket; None at EOF."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    length, msg_id = HEADER.unpack(header)
    if not 1 <= length <= MAX_FRAME:
        raise IpcError(f"IPC frame of {length} bytes is out of bounds")
    body = _recv_exactly(sock, length - 1)
    if body is None:
        raise IpcError("truncated IPC frame body")
    return decode_body(msg_id, body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_packet(sock: socket.socket, maxfds: int = 1) -> tuple[Message | None, list[int]]:
    """One SOCK_SEQPACKET message and any descriptors with it; (None, []) at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_FRAME, maxfds)
    if not data:
        return None, list(fds)
    return decode(data), list(fds)
