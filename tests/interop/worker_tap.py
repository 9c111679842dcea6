"""A pass-through for the agent worker protocol that records what a worker reports.

The worker connects to the tap's `/agent` instead of the server's; every frame is forwarded
unchanged both ways, except that a JobAssignment without a URL gets the server's own (the job
then joins the room on the server, not through the tap); Twirp requests (a job's `ctx.api`,
which finds the tap in LIVEKIT_URL) are forwarded too. The worker's UpdateJobStatus messages
are kept: what the worker itself said about each job, whichever worker it is, whatever the
server then records (livekit-server records a job whose agent left a closing room as failed).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from livekit.protocol import agent

from tests.interop.livekit_server import HOST, free_port


@dataclass
class WorkerTap:
    upstream_ws: str
    """The server's WebSocket URL (ws://host:port)."""
    statuses: list[tuple[str, str, str]] = field(default_factory=list)
    """(job_id, status name, error) of every UpdateJobStatus, in order."""
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def final_status(self, job_id: str) -> tuple[str, str] | None:
        ended = [(s, e) for j, s, e in self.statuses if j == job_id and s != "JS_RUNNING"]
        return ended[-1] if ended else None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._relay)
        app.router.add_post("/twirp/{method:.+}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, HOST, self.port).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def _upstream_http(self) -> str:
        return self.upstream_ws.replace("ws://", "http://", 1)

    async def _forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self._upstream_http}{request.path}", data=await request.read(), headers=headers
            ) as resp,
        ):
            body = await resp.read()
            return web.Response(
                status=resp.status, body=body, content_type=resp.content_type or None
            )

    async def _relay(self, request: web.Request) -> web.WebSocketResponse:
        downstream = web.WebSocketResponse()
        await downstream.prepare(request)
        headers = {"Authorization": request.headers.get("Authorization", "")}
        url = f"{self.upstream_ws}/agent?{request.query_string}"
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url, headers=headers) as upstream,
        ):
            pumps = [
                asyncio.create_task(self._pump(downstream, upstream, self._from_worker)),
                asyncio.create_task(self._pump(upstream, downstream, self._from_server)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        with contextlib.suppress(Exception):
            await downstream.close()
        return downstream

    async def _pump(self, source: Any, sink: Any, inspect: Any) -> None:
        async for msg in source:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(inspect(msg.data))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(msg.data)
            else:
                break

    def _from_worker(self, data: bytes) -> bytes:
        msg = agent.WorkerMessage.FromString(data)
        if msg.WhichOneof("message") == "update_job":
            u = msg.update_job
            self.statuses.append((u.job_id, agent.JobStatus.Name(u.status), u.error))
        return data

    def _from_server(self, data: bytes) -> bytes:
        msg = agent.ServerMessage.FromString(data)
        if msg.WhichOneof("message") == "assignment" and not msg.assignment.url:
            msg.assignment.url = self.upstream_ws
            return msg.SerializeToString()
        return data
