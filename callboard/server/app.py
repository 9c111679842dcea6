"""The embedded server: an aiohttp runner with one loopback site, wired to its services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from callboard.log import get_logger
from callboard.server.agents import AgentEndpoint, server_info
from callboard.server.auth import KeyStore
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.dispatch import DispatchEngine
from callboard.server.ids import new_id
from callboard.server.rooms import RoomRegistry
from callboard.server.rtc.signal import RtcEndpoint
from callboard.server.sip.config import SipConfig
from callboard.server.sip.gateway import SipGateway
from callboard.server.sip.room_media import RoomMediaRooms
from callboard.server.sip.service import SipService
from callboard.server.sip.store import SipStore
from callboard.server.twirp import TwirpRouter

log = get_logger("server")
http_log = get_logger("server.http")
"""What aiohttp's request handling logs (our runner's `logger`), filtered by BadRequestFilter."""

SHUTDOWN_TIMEOUT_S = 5.0
CHATTY_MEDIA_LOGGERS: Final = ("aioice", "aiortc")
"""They log every ICE check at INFO: kept at WARNING."""
MAX_LOGGED_REASON: Final = 200


class BadRequestFilter(logging.Filter):
    """aiohttp logs every request it cannot parse (a header line over its limit, a broken
    chunked body, a bad request line) as "Error handling request" at ERROR, with a traceback.
    That is the client's mistake, already answered with 400: it becomes one WARNING line with
    the peer and the reason (never the request's bytes). Failures of our handlers keep their
    ERROR and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
            record.msg, record.args = "bad HTTP request refused", ()
            record.exc_info, record.exc_text = None, None
            # The reason without the bytes aiohttp quotes from the request (a header line
            # over the limit is often the Authorization header: never log what was sent).
            reason = str(exc.message).split("\n", 1)[0].split(": b'", 1)[0].rstrip(":")
            record.__dict__.update(
                peer=str(peer),
                status=exc.code,
                error=type(exc).__name__,
                reason=reason[:MAX_LOGGED_REASON],
            )
        return True


BAD_REQUESTS: Final = BadRequestFilter()


class EmbeddedServer:
    """`callboard server`: /agent, /rtc, Twirp RoomService and AgentDispatchService on one port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_id = new_id("ND_")
        self.keys = KeyStore(config.effective_keys, config.token_leeway)
        self.engine = DispatchEngine(self.keys, config)
        self.rooms = RoomRegistry(self.engine)
        self.sip_store = SipStore()
        self.sip: SipGateway | None = None
        if config.sip_port is not None:
            sip_config = SipConfig(host=config.host, port=config.sip_port)
            self.sip = SipGateway(sip_config, self.sip_store, RoomMediaRooms(self.rooms))
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._speakers: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server is not started")
        return self._port

    @property
    def url(self) -> str:
        """The ws:// URL that workers and SDKs use."""
        return f"ws://{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        info = server_info(self.config, self.node_id)
        agents = AgentEndpoint(self.keys, self.engine, self.config, info)
        app.router.add_get("/agent", agents.handle)
        RtcEndpoint(self.keys, self.rooms, info, self.config).install(app)
        app.on_shutdown.append(agents.on_shutdown)
        app.router.add_get("/", self._health)
        router = TwirpRouter(self.keys)
        self.rooms.install(router)
        SipService(self.sip_store, self.sip).install(router)
        router.install(app)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def start(self) -> None:
        """Bind and serve; with port 0 the bound port is in `self.port`."""
        if self.config.uses_dev_keys:
            log.warning(
                "using the public development API key: anyone who knows it can use this server; "
                "pass --keys or set LIVEKIT_KEYS for anything but local development",
                extra={"api_key": DEV_API_KEY, "api_secret_hint": f"{DEV_API_SECRET[:1]}..."},
            )
        for name in CHATTY_MEDIA_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        if BAD_REQUESTS not in http_log.filters:
            http_log.addFilter(BAD_REQUESTS)
        self._runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            logger=http_log,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else self.config.port
        if self.sip is not None:
            await self.sip.start()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self.rooms.sweep_task(), name="room-sweeper")
        self._speakers = loop.create_task(self.rooms.speakers_task(), name="room-speakers")
        log.info(
            "server listening",
            extra={"url": self.url, "node_id": self.node_id, "region": self.config.region},
        )

    async def aclose(self) -> None:
        """Stop listening, stop placing jobs, close every connection."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        for task in (self._sweeper, self._speakers):
            if task is not None:
                task.cancel()
        if self.sip is not None:
            await self.sip.aclose()
        await self.engine.aclose()
        await runner.cleanup()
        log.info("server stopped", extra={"node_id": self.node_id})

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.aclose()


@asynccontextmanager
async def run_server(config: ServerConfig | None = None) -> AsyncIterator[EmbeddedServer]:
    """`async with run_server(ServerConfig(port=0)) as srv:` — started, then closed."""
    server = EmbeddedServer(config or ServerConfig(port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()
