"""The worker's link to the server: `<ws_url>/agent`, register, send/receive, keepalive, and
reconnection with backoff. Messages queued while disconnected are sent after re-registering, so
job statuses are not lost across a cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from livekit import api
from livekit.protocol import agent, models

from callboard.log import get_logger
from callboard.version import __version__
from callboard.worker.options import ResolvedOptions

log = get_logger("worker.connection")

HEARTBEAT_INTERVAL_S: Final = 30.0
REGISTER_TIMEOUT_S: Final = 10.0
MAX_BACKOFF_S: Final = 10.0
TOKEN_TTL_S: Final = 6 * 3600


class ConnectionGiveUp(Exception):
    """The server could not be reached (or refused us) within the retry budget."""


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
        self._queue: asyncio.Queue[agent.WorkerMessage] = asyncio.Queue()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self.registered = asyncio.Event()
        self.worker_id = ""

    def send(self, msg: agent.WorkerMessage) -> None:
        """Queue a message; it goes out now, or after the next registration."""
        self._queue.put_nowait(msg)

    def cut(self) -> None:
        """Drop the current socket (tests and fault injection); reconnection follows."""
        if self._ws is not None:
            asyncio.get_running_loop().create_task(self._ws.close())

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
            if self._ws is not None:
                await self._ws.close()
            await self._session.close()

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
        msg = agent.ServerMessage.FromString(first.data)
        if msg.WhichOneof("message") != "register":
            raise ProtocolError("expected register response as first message")
        self.worker_id = msg.register.worker_id
        first_out = self._on_registered(
            Registration(msg.register.worker_id, msg.register.server_info, reconnect)
        )
        for out in first_out:
            await self._ws.send_bytes(out.SerializeToString())
        self.registered.set()

    async def _serve(self) -> None:
        assert self._ws is not None
        ws = self._ws
        sender = asyncio.create_task(self._send_task(ws), name="worker-send")
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY:
                    self._on_message(agent.ServerMessage.FromString(frame.data))
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    raise ProtocolError(f"websocket error: {ws.exception()}")
            if ws.close_code not in (None, aiohttp.WSCloseCode.OK):
                raise ProtocolError(f"server closed the connection with code {ws.close_code}")
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _send_task(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await self._queue.get()
            try:
                await ws.send_bytes(msg.SerializeToString())
            except (ConnectionError, aiohttp.ClientError):
                # keep it for the next session, in order
                self._requeue_front(msg)
                await ws.close()
                return
            finally:
                self._queue.task_done()

    def _requeue_front(self, msg: agent.WorkerMessage) -> None:
        rest = [msg]
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
            self._queue.task_done()
        for m in rest:
            self._queue.put_nowait(m)

    async def wait_sent(self) -> None:
        """Until every queued message has been handed to the socket (bound it with a timeout)."""
        await self._queue.join()


class ProtocolError(Exception):
    """The server sent something the protocol does not allow."""
