"""Helpers for the job-engine tests: a worker with the PROCESS executor against the embedded
server, dispatch-and-wait, and the leak checks (child processes, file descriptors)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import psutil
from livekit import api
from livekit.protocol import agent

from callboard import JobExecutorType, Worker, WorkerOptions
from callboard.server.app import EmbeddedServer
from tests.conftest import API_KEY, API_SECRET
from tests.job import agents

DEADLINE_S: Final = 15.0
ENDED = (agent.JS_SUCCESS, agent.JS_FAILED)


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def process_worker(
    server: EmbeddedServer, entry: Callable[..., Any], **options: Any
) -> AsyncIterator[Worker]:
    """A registered worker running `entry` in zygote-forked processes; on exit, closed and
    checked for leaked child processes and descriptors."""
    children_before, fds_before = child_pids(), fd_count()
    opts = WorkerOptions(
        entrypoint_fnc=entry,
        prewarm_fnc=options.pop("prewarm_fnc", agents.prewarm),
        job_executor_type=JobExecutorType.PROCESS,
        ws_url=server.url,
        api_key=API_KEY,
        api_secret=API_SECRET,
        host="127.0.0.1",
        port=0,
        load_fnc=lambda: 0.0,
        num_idle_processes=options.pop("num_idle_processes", 2),
        shutdown_process_timeout=options.pop("shutdown_process_timeout", 2.0),
        **options,
    )
    worker = Worker(opts)
    run = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.registered or run.done(), "worker registration")
        if run.done():
            await run
        yield worker
    finally:
        await worker.aclose()
        await run
        await until(lambda: child_pids() <= children_before, "job processes to be reaped", 10)
        await until(lambda: fd_count() <= fds_before, "descriptors back to baseline", 5)


@asynccontextmanager
async def api_client(server: EmbeddedServer) -> AsyncIterator[api.LiveKitAPI]:
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as client:
        yield client


async def dispatch_and_wait(
    lk: api.LiveKitAPI, room: str, timeout: float = DEADLINE_S
) -> agent.JobState:
    """Create `room` (automatic dispatch) and return its job's terminal state."""
    await lk.room.create_room(api.CreateRoomRequest(name=room))
    return await terminal_state(lk, room, timeout)


async def job_state(lk: api.LiveKitAPI, room: str) -> agent.JobState | None:
    for d in await lk.agent_dispatch.list_dispatch(room):
        for job in d.state.jobs:
            return job.state
    return None


async def terminal_state(
    lk: api.LiveKitAPI, room: str, timeout: float = DEADLINE_S
) -> agent.JobState:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state = await job_state(lk, room)
        if state is not None and state.status in ENDED:
            return state
        if loop.time() > deadline:
            raise AssertionError(f"job in {room} did not end within {timeout:g}s: {state}")
        await asyncio.sleep(0.05)
