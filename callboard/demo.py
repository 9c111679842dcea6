"""`callboard demo`: the whole flow on one machine, nothing to install or configure.

Starts the embedded server on a free loopback port and a real worker (prewarmed job processes
forked from a zygote), places calls the way LiveKit's SIP gateway does (rooms named
`call-_<caller>_<random>`, created through RoomService with the official `livekit-api`
client), and reports each job's terminal status as the server recorded it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time

from livekit import api
from livekit.protocol import agent

from callboard.job.context import JobContext, JobExecutorType, JobRequest
from callboard.log import get_logger
from callboard.server.app import run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.ids import BASE57
from callboard.worker.options import WorkerOptions
from callboard.worker.worker import Worker

log = get_logger("demo")

CALLER = "+56975231235"
CALL_SECONDS = 0.5
DEMO_TIMEOUT_S = 60.0
ENDED = (agent.JS_SUCCESS, agent.JS_FAILED)


def sip_room_name(caller: str) -> str:
    """A room name as LiveKit's SIP gateway makes it for an individual dispatch rule."""
    return f"call-_{caller}_" + "".join(secrets.choice(BASE57) for _ in range(12))


async def answer_call(ctx: JobContext) -> None:
    """The demo agent: a real job in its own process (a voice agent would ctx.connect())."""
    logging.getLogger("demo.agent").info(
        "answering call", extra={"room": ctx.room_name, "job_id": ctx.job.id}
    )
    await asyncio.sleep(CALL_SECONDS)


async def accept_calls(req: JobRequest) -> None:
    await req.accept(identity=f"agent-{req.id}", name="Asistente de Voz")


async def run_demo(calls: int) -> int:
    async with run_server(ServerConfig(port=0)) as server:
        worker = Worker(
            WorkerOptions(
                entrypoint_fnc=answer_call,
                request_fnc=accept_calls,
                job_executor_type=JobExecutorType.PROCESS,
                ws_url=server.url,
                api_key=DEV_API_KEY,
                api_secret=DEV_API_SECRET,
                num_idle_processes=2,
                host="127.0.0.1",
                port=0,
            ),
            devmode=True,
        )
        running = asyncio.create_task(worker.run())
        try:
            statuses = await _place_calls(server.http_url, worker, calls)
        finally:
            await worker.drain(10)
            await worker.aclose()
            await running
    return _report(statuses)


async def _place_calls(http_url: str, worker: Worker, calls: int) -> dict[str, agent.JobState]:
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while not worker.registered:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not register with the embedded server")
        await asyncio.sleep(0.05)
    async with api.LiveKitAPI(http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
        rooms = [sip_room_name(CALLER) for _ in range(calls)]
        await asyncio.gather(*(lk.room.create_room(api.CreateRoomRequest(name=r)) for r in rooms))
        states: dict[str, agent.JobState] = {}
        while time.monotonic() < deadline and len(states) < len(rooms):
            for room in rooms:
                for d in await lk.agent_dispatch.list_dispatch(room):
                    for job in d.state.jobs:
                        if job.state.status in ENDED:
                            states[room] = job.state
            await asyncio.sleep(0.1)
    return states


def _report(states: dict[str, agent.JobState]) -> int:
    ok = bool(states) and all(s.status == agent.JS_SUCCESS for s in states.values())
    for room, state in states.items():
        took = (state.ended_at - state.started_at) / 1e9 if state.ended_at else 0.0
        line = f"{room}: {agent.JobStatus.Name(state.status)} in {took:.2f}s"
        print(line + (f" ({state.error})" if state.error else ""), file=sys.stdout)
    verdict = "passed" if ok else "FAILED"
    print(f"demo {verdict}: {len(states)} call(s) answered by job processes", file=sys.stdout)
    return 0 if ok else 1
