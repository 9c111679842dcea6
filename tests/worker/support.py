"""Helpers for the worker acceptance tests: fast options, a running worker, Twirp calls with
bounded polling, and the child-process leak check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psutil
import pytest
from livekit import api
from livekit.protocol import agent

from callboard import JobExecutorType, Worker, WorkerOptions
from callboard.job.context import RunningJobInfo
from callboard.job.executor import JobExecutor, RunningJob
from callboard.job.thread import ThreadExecutor
from callboard.server.app import EmbeddedServer
from callboard.server.workers import WorkerSession
from tests.worker.agents import jobs

DEV_KEY: Final = "devkey"
DEV_SECRET: Final = "secret"
DEADLINE_S: Final = 5.0
POLL_S: Final = 0.01
STOP_DEADLINE_S: Final = 20.0
ENDED: Final = frozenset({agent.JS_SUCCESS, agent.JS_FAILED})

FAST_TIMINGS: Final[dict[str, Any]] = {
    "status_interval": 0.2,
    "assignment_timeout": 2.0,
    "availability_timeout": 1.0,
    "drain_timeout": 10.0,
    "shutdown_process_timeout": 2.0,
    "initialize_process_timeout": 10.0,
}

EXECUTORS = [
    pytest.param(JobExecutorType.THREAD, id="thread"),
    pytest.param(JobExecutorType.PROCESS, id="process"),
]
"""Tests that must hold for both job executors are parametrized over this."""


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(POLL_S)


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


def fast_options(
    server: HasUrl,
    executor: JobExecutorType = JobExecutorType.THREAD,
    *,
    key: str = DEV_KEY,
    secret: str = DEV_SECRET,
    **overrides: Any,
) -> WorkerOptions:
    """Options for a worker on `server` with short timings, a free HTTP port and no CPU load."""
    values: dict[str, Any] = {
        "entrypoint_fnc": jobs.scripted,
        "prewarm_fnc": jobs.prewarm,
        "job_executor_type": executor,
        "ws_url": server.url,
        "api_key": key,
        "api_secret": secret,
        "load_fnc": lambda: 0.0,
        "port": 0,
        "host": "127.0.0.1",
        "num_idle_processes": 1,
        **FAST_TIMINGS,
    }
    values.update(overrides)
    return WorkerOptions(**values)


@contextlib.asynccontextmanager
async def running_worker(
    opts: WorkerOptions, *, devmode: bool = False, executor: JobExecutor | None = None
) -> AsyncIterator[Worker]:
    """A started and registered worker; stopped (jobs terminated) on exit."""
    worker = Worker(opts, devmode=devmode, executor=executor)
    task = asyncio.create_task(worker.run(), name="test-worker-run")
    try:
        await wait_until(
            lambda: worker.registered or task.done(), "the worker to register", timeout=15.0
        )
        if task.done():
            await task
            raise AssertionError("the worker stopped before registering")
        yield worker
    finally:
        if not task.done():
            worker.request_shutdown(fast=True)
        await asyncio.wait_for(task, STOP_DEADLINE_S)


def server_worker(server: EmbeddedServer, worker_id: str) -> WorkerSession:
    """The server's session for `worker_id`."""
    sessions = {s.id: s for s in server.engine.workers}
    assert worker_id in sessions, f"{worker_id} is not registered (have {sorted(sessions)})"
    return sessions[worker_id]


@dataclass
class Control:
    """RoomService and AgentDispatchService calls, as an app would make them."""

    lk: api.LiveKitAPI

    async def create_room(self, room: str) -> None:
        await self.lk.room.create_room(api.CreateRoomRequest(name=room))

    async def dispatch(self, room: str, agent_name: str, metadata: str = "") -> api.AgentDispatch:
        return await self.lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
        )

    async def jobs(self, room: str, agent_name: str | None = None) -> list[agent.Job]:
        """The jobs of `room` (of the dispatches for `agent_name`, when given)."""
        dispatches = await self.lk.agent_dispatch.list_dispatch(room)
        return [
            job
            for d in dispatches
            if agent_name is None or d.agent_name == agent_name
            for job in d.state.jobs
        ]

    async def job(self, room: str, agent_name: str | None = None) -> agent.Job:
        """The one job in `room` (for `agent_name`)."""
        (job,) = await self.jobs(room, agent_name)
        return job

    async def wait_job(
        self,
        room: str,
        predicate: Callable[[agent.Job], bool],
        what: str,
        *,
        agent_name: str | None = None,
        timeout: float = DEADLINE_S,
    ) -> agent.Job:
        """Poll ListDispatch until the one job in `room` (for `agent_name`) meets `predicate`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            jobs_now = await self.jobs(room, agent_name)
            if len(jobs_now) == 1 and predicate(jobs_now[0]):
                return jobs_now[0]
            if loop.time() > deadline:
                states = [agent.JobStatus.Name(j.state.status) for j in jobs_now]
                raise AssertionError(f"timed out waiting for {what} in {room!r}: {states}")
            await asyncio.sleep(0.02)

    async def wait_status(
        self,
        room: str,
        status: int,
        *,
        agent_name: str | None = None,
        timeout: float = DEADLINE_S,
    ) -> agent.Job:
        return await self.wait_job(
            room,
            lambda j: j.state.status == status,
            agent.JobStatus.Name(status),
            agent_name=agent_name,
            timeout=timeout,
        )

    async def wait_ended(
        self, room: str, *, agent_name: str | None = None, timeout: float = DEADLINE_S
    ) -> agent.Job:
        return await self.wait_job(
            room,
            lambda j: j.state.status in ENDED,
            "a terminal status",
            agent_name=agent_name,
            timeout=timeout,
        )


@contextlib.asynccontextmanager
async def control(
    server: EmbeddedServer, key: str = DEV_KEY, secret: str = DEV_SECRET
) -> AsyncIterator[Control]:
    async with api.LiveKitAPI(server.http_url, key, secret) as lk:
        yield Control(lk)


class GatedExecutor:
    """The THREAD executor, except that `launch` waits for `gate`: a job stuck launching."""

    def __init__(self) -> None:
        self.inner = ThreadExecutor(
            jobs.scripted, jobs.prewarm, FAST_TIMINGS["shutdown_process_timeout"]
        )
        self.gate = asyncio.Event()
        self.launching = asyncio.Event()
        self.launched: list[RunningJob] = []

    async def start(self) -> None:
        await self.inner.start()

    async def launch(self, info: RunningJobInfo) -> RunningJob:
        self.launching.set()
        await self.gate.wait()
        job = await self.inner.launch(info)
        self.launched.append(job)
        return job

    def set_warm_target(self, jobs: int) -> None:
        return None

    def process_pids(self) -> list[int]:
        return self.inner.process_pids()

    def shared_pids(self) -> list[int]:
        return self.inner.shared_pids()

    @property
    def idle_count(self) -> int:
        return self.inner.idle_count

    async def aclose(self) -> None:
        self.gate.set()
        await self.inner.aclose()


# -- child processes ------------------------------------------------------------------------


class LeakedChildProcesses(UserWarning):
    """Job-engine processes outlived the worker that started them (callboard/job's concern)."""


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} {p.status()} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            out.append(f"{pid} (gone)")
    return out


@contextlib.asynccontextmanager
async def no_leftover_children(timeout: float = 5.0) -> AsyncIterator[None]:
    """SOFT CHECK, NOT A TEST FAILURE: after the block, this process's children must be back to
    the baseline within `timeout`. Leftovers are reported as a LeakedChildProcesses warning (and
    killed) rather than failing the worker suite: reaping job processes is callboard/job's job.
    """
    baseline = child_pids()
    yield
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    leftovers = child_pids() - baseline
    while leftovers and loop.time() < deadline:
        await asyncio.sleep(0.05)
        leftovers = child_pids() - baseline
    if not leftovers:
        return
    warnings.warn(
        LeakedChildProcesses(f"child processes left behind: {describe(leftovers)}"), stacklevel=2
    )
    for pid in leftovers:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


# -- logs -----------------------------------------------------------------------------------


def records_with(records: list[logging.LogRecord], message: str) -> list[logging.LogRecord]:
    """Records whose message starts with `message`."""
    return [r for r in records if r.getMessage().startswith(message)]
