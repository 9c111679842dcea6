"""The embedded server: an aiohttp runner with one loopback site, wired to its services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from callboard.log import get_logger
from callboard.server.agents import AgentEndpoint, server_info
from callboard.server.auth import KeyStore
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.dispatch import DispatchEngine
from callboard.server.ids import new_id
from callboard.server.rooms import RoomRegistry
from callboard.server.twirp import TwirpRouter

log = get_logger("server")

SHUTDOWN_TIMEOUT_S = 5.0


class EmbeddedServer:
    """`callboard server`: /agent, Twirp RoomService and AgentDispatchService on one port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_id = new_id("ND_")
        self.keys = KeyStore(config.effective_keys, config.token_leeway)
        self.engine = DispatchEngine(self.keys, config)
        self.rooms = RoomRegistry(self.engine)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._sweeper: asyncio.Task[None] | None = None

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
        agents = AgentEndpoint(
            self.keys, self.engine, self.config, server_info(self.config, self.node_id)
        )
        app.router.add_get("/agent", agents.handle)
        app.on_shutdown.append(agents.on_shutdown)
        app.router.add_get("/", self._health)
        router = TwirpRouter(self.keys)
        self.rooms.install(router)
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
        self._runner = web.AppRunner(
            self.build_app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._sweeper = asyncio.get_running_loop().create_task(
            self.rooms.sweep_task(), name="room-sweeper"
        )
        log.info(
            "server listening",
            extra={"url": self.url, "node_id": self.node_id, "region": self.config.region},
        )

    async def aclose(self) -> None:
        """Stop listening, stop placing jobs, close every connection."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        if self._sweeper is not None:
            self._sweeper.cancel()
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
