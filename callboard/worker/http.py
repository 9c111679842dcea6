"""The worker's HTTP server: `/` liveness, `/ready` (drain-aware), `/worker` JSON, `/metrics`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from callboard.log import get_logger
from callboard.worker.errors import WorkerStartError

if TYPE_CHECKING:
    from callboard.worker.worker import Worker

log = get_logger("worker.http")


class WorkerHttpServer:
    def __init__(self, worker: Worker, host: str, port: int) -> None:
        self._worker = worker
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.bound_port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._alive)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/worker", self._info)
        app.router.add_get("/metrics", self._metrics)
        self._worker.metrics.attach(self._worker)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host or None, self._port)
        try:
            await site.start()
        except OSError as e:
            where = f"{self._host or '0.0.0.0'}:{self._port}"
            raise WorkerStartError(
                f"cannot serve the worker's HTTP endpoints on {where}: "
                f"{e.strerror or e} (option port; 0 picks a free port)"
            ) from None
        sockets = getattr(site._server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self._port
        self._worker.http_port = self.bound_port
        log.info(
            "worker http server listening",
            extra={"host": self._host or "0.0.0.0", "port": self.bound_port},
        )

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _alive(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _ready(self, request: web.Request) -> web.Response:
        w = self._worker
        if w.registered and not w.draining:
            return web.Response(text="ready")
        why = "draining" if w.draining else "not registered with the server"
        return web.Response(status=503, text=why)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(worker_info(self._worker))

    async def _metrics(self, request: web.Request) -> web.Response:
        # per-process memory is read from /proc: off the event loop
        body = await asyncio.get_running_loop().run_in_executor(None, self._worker.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def worker_info(w: Worker) -> dict[str, Any]:
    return {
        "id": w.id,
        "state": w.state.value,
        "agent_name": w.options.agent_name,
        "load": round(w.load, 4),
        "capacity": w.admission.capacity,
        "job_cost": {
            "cpu": round(w.admission.cost.cpu, 4),
            "memory_mb": round(w.admission.cost.memory_mb, 1),
            "measured": w.admission.model.cpu_measured,
        },
        "draining": w.draining,
        "uptime_s": round(w.uptime_s, 3),
        "jobs": [
            {
                "id": j.info.job.id,
                "room": j.info.job.room.name,
                "pid": j.handle.pid,
                "running_s": round(time.time() - j.started_at, 3),
            }
            for j in w.active_jobs
        ],
    }
