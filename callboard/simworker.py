"""A protocol-level simulated worker: registers on /agent, accepts offers, reports each job
running then finished. It runs no agent code; benchmarks, tests and the demo use it to drive the
server's dispatch engine with many cheap workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from livekit import api
from livekit.protocol import agent

from callboard.log import get_logger

log = get_logger("simworker")


def agent_token(api_key: str, api_secret: str, ttl_s: float = 3600) -> str:
    """A worker's /agent token: the `agent` video grant."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_grants(api.VideoGrants(agent=True))
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .to_jwt()
    )


def agent_ws_url(ws_url: str) -> str:
    """`<ws_url>/agent`, with http(s) turned into ws(s)."""
    base = ws_url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return base + "/agent"


@dataclass
class SimJob:
    job: agent.Job
    assigned_at: float
    token: str


@dataclass
class SimWorker:
    """One simulated worker. `accept` decides offers; `job_seconds` is how long a job runs
    (None: until terminated)."""

    ws_url: str
    api_key: str
    api_secret: str
    agent_name: str = ""
    job_type: int = agent.JT_ROOM
    accept: Callable[[agent.Job], bool] = lambda job: True
    job_seconds: float | None = 0.0
    worker_id: str = ""
    offers: int = 0
    jobs: dict[str, SimJob] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    terminated: list[str] = field(default_factory=list)
    on_assignment: Callable[[SimJob], None] | None = None
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _session: aiohttp.ClientSession | None = None
    _task: asyncio.Task[None] | None = None
    _job_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    registered: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            agent_ws_url(self.ws_url),
            headers={"Authorization": f"Bearer {agent_token(self.api_key, self.api_secret)}"},
            max_msg_size=0,
        )
        reg = agent.RegisterWorkerRequest(
            type=self.job_type,  # type: ignore[arg-type]
            agent_name=self.agent_name,
            version="sim",
        )
        await self._send(agent.WorkerMessage(register=reg))
        first = agent.ServerMessage()
        first.ParseFromString(await self._ws.receive_bytes(timeout=10))
        if first.WhichOneof("message") != "register":
            raise RuntimeError("expected register response as the first message")
        self.worker_id = first.register.worker_id
        self.registered.set()
        self._task = asyncio.create_task(self._recv_task(), name=f"sim-{self.worker_id}")

    async def _send(self, msg: agent.WorkerMessage) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(msg.SerializeToString())

    async def update_status(self, status: int, load: float) -> None:
        upd = agent.UpdateWorkerStatus(status=status, load=load, job_count=len(self.jobs))  # type: ignore[arg-type]
        await self._send(agent.WorkerMessage(update_worker=upd))

    async def _recv_task(self) -> None:
        assert self._ws is not None
        async for frame in self._ws:
            if frame.type != aiohttp.WSMsgType.BINARY:
                break
            msg = agent.ServerMessage()
            msg.ParseFromString(frame.data)
            which = msg.WhichOneof("message")
            if which == "availability":
                self.offers += 1
                job = msg.availability.job
                ok = self.accept(job)
                resp = agent.AvailabilityResponse(
                    job_id=job.id, available=ok, participant_identity=f"sim-{job.id}"
                )
                await self._send(agent.WorkerMessage(availability=resp))
            elif which == "assignment":
                a = msg.assignment
                sim = SimJob(a.job, time.perf_counter(), a.token)
                self.jobs[a.job.id] = sim
                await self._report(a.job.id, agent.JS_RUNNING)
                if self.on_assignment is not None:
                    self.on_assignment(sim)
                t = asyncio.create_task(self._run_job(a.job.id))
                self._job_tasks.add(t)
                t.add_done_callback(self._job_tasks.discard)
            elif which == "termination":
                self.terminated.append(msg.termination.job_id)
                if self.jobs.pop(msg.termination.job_id, None) is not None:
                    await self._report(msg.termination.job_id, agent.JS_SUCCESS)

    async def _run_job(self, job_id: str) -> None:
        if self.job_seconds is None:
            return
        if self.job_seconds:
            await asyncio.sleep(self.job_seconds)
        if self.jobs.pop(job_id, None) is not None:
            self.finished[job_id] = time.perf_counter()
            with contextlib.suppress(ConnectionError):
                await self._report(job_id, agent.JS_SUCCESS)

    async def _report(self, job_id: str, status: int) -> None:
        upd = agent.UpdateJobStatus(job_id=job_id, status=status)  # type: ignore[arg-type]
        await self._send(agent.WorkerMessage(update_job=upd))

    async def aclose(self) -> None:
        for t in list(self._job_tasks):
            t.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
