"""The worker's link to the server: `<ws_url>/agent`, register, send/receive, keepalive, and
reconnection with backoff. Messages queued while disconnected are sent after re-registering, so
job statuses are not lost across a cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from google.protobuf.message import DecodeError
from livekit import api
from livekit.protocol import agent, models

from callboard.log import get_logger
from callboard.version import __version__
from callboard.worker.errors import ConnectionGiveUp
from callboard.worker.options import ResolvedOptions

log = get_logger("worker.connection")

HEARTBEAT_INTERVAL_S: Final = 30.0
REGISTER_TIMEOUT_S: Final = 10.0
MAX_BACKOFF_S: Final = 10.0
TOKEN_TTL_S: Final = 6 * 3600


@dataclass(frozen=True)
class Registration:
    worker_id: str
    server_info: models.ServerInfo
    reconnect: bool


OnRegistered = Callable[[Registration], list[agent.WorkerMessage]]
OnMessage = Callable[[agent.ServerMessage], None]
OnDisconnected = Callable[[str], None]


def agent_url(ws_url: str) -> str:
    """`<ws_url>/agent` with http(s) mapped to ws(s)."""
    base = ws_url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return base + "/agent"


def backoff_s(attempt: int) -> float:
    """Delay before reconnect attempt `attempt` (0-based): 0, 2, 4, ... up to 10 s."""
    return min(2.0 * attempt, MAX_BACKOFF_S)


class Connection:
    """Keeps one registered /agent session alive and carries messages both ways."""

    def __init__(
        self,
        opts: ResolvedOptions,
        on_registered: OnRegistered,
        on_message: OnMessage,
        on_disconnected: OnDisconnected,
    ) -> None:
        self._opts = opts
        self._on_registered = on_registered
        self._on_message = on_message
        self._on_disconnected = on_disconnected
        self._pending: deque[agent.WorkerMessage] = deque()
        """Messages not yet handed to a socket, oldest first (kept across reconnections)."""
        self._has_pending = asyncio.Event()
        self._all_sent = asyncio.Event()
        self._all_sent.set()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._cutting: asyncio.Task[bool] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.registered = asyncio.Event()
        self.worker_id = ""
        self.session = 0
        """How many registrations so far: tells one session from the next even if a server
        hands out the same worker id again."""

    def send(self, msg: agent.WorkerMessage) -> None:
        """Queue a message; it goes out now, or after the next registration."""
        self._pending.append(msg)
        self._has_pending.set()
        self._all_sent.clear()

    def pending(self) -> list[agent.WorkerMessage]:
        """Messages queued and not yet handed to a socket."""
        return list(self._pending)

    def cut(self) -> None:
        """Drop the current socket (tests and fault injection); reconnection follows."""
        if self._ws is not None:
            self._cutting = asyncio.get_running_loop().create_task(self._ws.close())

    async def run(self) -> None:
        """Connect, serve, and reconnect until cancelled; ConnectionGiveUp past max_retry."""
        self._session = aiohttp.ClientSession(proxy=self._opts.opts.http_proxy)
        attempt = 0
        reconnect = False
        try:
            while True:
                try:
                    await self._connect(reconnect)
                    attempt = 0
                    reconnect = True
                    await self._serve()
                    reason = "server closed the connection"
                except aiohttp.WSServerHandshakeError as e:
                    if e.status in (401, 403):
                        raise ConnectionGiveUp(
                            f"the server refused the worker's token ({e.status}): check "
                            "api_key/api_secret (LIVEKIT_API_KEY, LIVEKIT_API_SECRET)"
                        ) from None
                    reason = f"handshake failed with HTTP {e.status}"
                except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as e:
                    reason = f"{type(e).__name__}: {e}"
                await self._close_ws()
                self._lost(reason)
                if attempt >= self._opts.opts.max_retry:
                    raise ConnectionGiveUp(
                        f"could not reach {self._opts.ws_url} after {attempt} retries ({reason})"
                    )
                delay = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "connection to the server lost, reconnecting",
                    extra={
                        "worker_id": self.worker_id,
                        "reason": reason,
                        "attempt": attempt,
                        "max_retry": self._opts.opts.max_retry,
                        "delay_s": delay,
                    },
                )
                await asyncio.sleep(delay)
        finally:
            self.registered.clear()
            await self._close_ws()
            await self._session.close()

    async def _close_ws(self) -> None:
        """Close the current socket, if any (a half-done handshake must not linger)."""
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()

    def _lost(self, reason: str) -> None:
        was_registered = self.registered.is_set()
        self.registered.clear()
        if was_registered:
            self._on_disconnected(reason)

    async def _connect(self, reconnect: bool) -> None:
        assert self._session is not None
        token = (
            api.AccessToken(self._opts.api_key, self._opts.api_secret)
            .with_grants(api.VideoGrants(agent=True))
            .with_ttl(datetime.timedelta(seconds=TOKEN_TTL_S))
            .to_jwt()
        )
        self._ws = await self._session.ws_connect(
            agent_url(self._opts.ws_url),
            headers={"Authorization": f"Bearer {token}"},
            heartbeat=HEARTBEAT_INTERVAL_S,
            autoping=True,
            max_msg_size=0,
        )
        register = agent.RegisterWorkerRequest(
            type=self._opts.opts.worker_type.value,
            agent_name=self._opts.agent_name,
            version=__version__,
            allowed_permissions=self._opts.opts.permissions.to_proto(),
        )
        if self._opts.opts.namespace:
            register.namespace = self._opts.opts.namespace
        await self._ws.send_bytes(agent.WorkerMessage(register=register).SerializeToString())
        first = await self._ws.receive(timeout=REGISTER_TIMEOUT_S)
        if first.type != aiohttp.WSMsgType.BINARY:
            raise ProtocolError(f"expected the register response, got a {first.type.name} frame")
        msg = _decode(first.data)
        if msg is None:
            raise ProtocolError("malformed register response: not a valid ServerMessage")
        if msg.WhichOneof("message") != "register":
            raise ProtocolError("expected register response as first message")
        self.worker_id = msg.register.worker_id
        self.session += 1
        self._drop_stale_answers()
        # Registered from here on: what on_registered computes (state, status) sees it, and
        # what it queues goes out after its first messages (the send task starts later).
        self.registered.set()
        first_out = self._on_registered(
            Registration(msg.register.worker_id, msg.register.server_info, reconnect)
        )
        for out in first_out:
            await self._ws.send_bytes(out.SerializeToString())

    def _drop_stale_answers(self) -> None:
        """AvailabilityResponses still queued answer offers of a previous session: the new
        session never made them, so they are dropped rather than sent."""
        stale = [m for m in self._pending if m.WhichOneof("message") == "availability"]
        if not stale:
            return
        self._pending = deque(m for m in self._pending if m.WhichOneof("message") != "availability")
        log.info(
            "dropped answers to offers of the previous connection",
            extra={"worker_id": self.worker_id, "jobs": [m.availability.job_id for m in stale]},
        )

    async def _serve(self) -> None:
        assert self._ws is not None
        ws = self._ws
        sender = asyncio.create_task(self._send_task(ws), name="worker-send")
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY:
                    self._deliver(frame.data)
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    raise ProtocolError(f"websocket error: {ws.exception()}")
            if ws.close_code not in (None, aiohttp.WSCloseCode.OK):
                raise ProtocolError(f"server closed the connection with code {ws.close_code}")
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    def _deliver(self, data: bytes) -> None:
        """Hand one frame to the worker; a bad frame or a failing handler is logged, and the
        connection (with every job on it) carries on."""
        msg = _decode(data)
        if msg is None:
            log.warning(
                "malformed message from the server, ignored",
                extra={"worker_id": self.worker_id, "size": len(data)},
            )
            return
        try:
            self._on_message(msg)
        except Exception:
            log.exception(
                "failed to handle a server message",
                extra={"worker_id": self.worker_id, "message": msg.WhichOneof("message")},
            )

    async def _send_task(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send queued messages in order. One leaves the queue only once the socket took it: a
        failed send keeps it, first in line, for the next session."""
        while True:
            if not self._pending:
                self._all_sent.set()
                self._has_pending.clear()
                await self._has_pending.wait()
                continue
            msg = self._pending[0]
            try:
                await ws.send_bytes(msg.SerializeToString())
            except (ConnectionError, aiohttp.ClientError):
                await ws.close()
                return
            if self._pending and self._pending[0] is msg:
                self._pending.popleft()

    async def wait_sent(self) -> None:
        """Until every queued message has been handed to the socket (bound it with a timeout)."""
        await self._all_sent.wait()


def _decode(data: bytes) -> agent.ServerMessage | None:
    try:
        return agent.ServerMessage.FromString(data)
    except DecodeError:
        return None


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""
