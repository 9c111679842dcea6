"""A protocol-level fake of LiveKit's `/agent` endpoint: it records every WorkerMessage the worker
sends (with its arrival time) and lets the test send ServerMessages, so the worker's side of the
protocol can be checked field by field with the livekit-protocol types.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import WSMsgType, web
from livekit.protocol import agent, models

FAKE_WORKER_ID: Final = "AW_fakeworker01"
FAKE_REGION: Final = "fake-region"
DEADLINE_S: Final = 5.0


@dataclass(frozen=True)
class Received:
    at: float
    """loop.time() of arrival."""
    msg: agent.WorkerMessage

    @property
    def kind(self) -> str:
        return str(self.msg.WhichOneof("message"))


class FakeAgentServer:
    """One worker connection at a time; `received` keeps every message of every connection."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.authorizations: list[str] = []
        self.query_tokens: list[str] = []
        self.connections = 0
        self._ws: web.WebSocketResponse | None = None
        self._new = asyncio.Event()
        self._cursors: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization", ""))
        self.query_tokens.append(request.query.get("access_token", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self.connections += 1
        loop = asyncio.get_running_loop()
        async for frame in ws:
            if frame.type != WSMsgType.BINARY:
                continue
            msg = agent.WorkerMessage.FromString(frame.data)
            self.received.append(Received(loop.time(), msg))
            self._new.set()
            if msg.WhichOneof("message") == "register":
                info = models.ServerInfo(region=FAKE_REGION, protocol=16, node_id="ND_fake")
                reply = agent.RegisterWorkerResponse(worker_id=FAKE_WORKER_ID, server_info=info)
                await self.send(agent.ServerMessage(register=reply))
            elif msg.WhichOneof("message") == "ping":  # as livekit-server answers it
                pong = agent.WorkerPong(last_timestamp=msg.ping.timestamp)
                await self.send(agent.ServerMessage(pong=pong))
        return ws

    async def send(self, msg: agent.ServerMessage) -> None:
        assert self._ws is not None, "no worker connected"
        await self._ws.send_bytes(msg.SerializeToString())

    def of_kind(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.kind == kind]

    async def next(
        self,
        kind: str,
        where: Callable[[agent.WorkerMessage], bool] = lambda m: True,
        timeout: float = DEADLINE_S,
    ) -> Received:
        """The next message of `kind` (after the last one returned) that satisfies `where`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            matching = self.of_kind(kind)
            start = self._cursors.get(kind, 0)
            for i in range(start, len(matching)):
                if where(matching[i].msg):
                    self._cursors[kind] = i + 1
                    return matching[i]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {kind} message within {timeout:g}s")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                continue
