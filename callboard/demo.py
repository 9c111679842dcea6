"""`callboard demo`: the whole dispatch flow on one machine, with the official API client.

Starts the embedded server on a free loopback port, registers simulated workers, places calls
(rooms named like the SIP gateway's, created through RoomService with the official
`livekit-api` client), and reports each job's terminal status from ListDispatch.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from livekit import api
from livekit.protocol import agent

from callboard.log import get_logger
from callboard.server.app import run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.ids import BASE57
from callboard.simworker import SimWorker

log = get_logger("demo")

CALLER = "+56975231235"
JOB_SECONDS = 0.2
DEMO_TIMEOUT_S = 30.0


def sip_room_name(caller: str) -> str:
    """A room name as LiveKit's SIP gateway makes it for an individual dispatch rule."""
    return f"call-_{caller}_" + "".join(secrets.choice(BASE57) for _ in range(12))


async def run_demo(calls: int, workers: int) -> int:
    async with run_server(ServerConfig(port=0)) as server:
        sims = [
            SimWorker(server.url, DEV_API_KEY, DEV_API_SECRET, job_seconds=JOB_SECONDS)
            for _ in range(workers)
        ]
        for sim in sims:
            await sim.start()
        async with api.LiveKitAPI(server.http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
            rooms = []
            for _ in range(calls):
                name = sip_room_name(CALLER)
                await lk.room.create_room(api.CreateRoomRequest(name=name))
                rooms.append(name)
            statuses = await _wait_for_outcomes(lk, rooms)
        for sim in sims:
            await sim.aclose()
    ok = all(s == agent.JS_SUCCESS for s in statuses.values())
    for room, status in statuses.items():
        print(f"{room}: {agent.JobStatus.Name(status)}", file=sys.stdout)
    print(
        f"demo {'passed' if ok else 'FAILED'}: {len(statuses)} call(s), "
        f"{sum(s == agent.JS_SUCCESS for s in statuses.values())} job(s) succeeded",
        file=sys.stdout,
    )
    return 0 if ok else 1


async def _wait_for_outcomes(lk: api.LiveKitAPI, rooms: list[str]) -> dict[str, int]:
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    statuses: dict[str, int] = {}
    while time.monotonic() < deadline:
        for name in rooms:
            for d in await lk.agent_dispatch.list_dispatch(name):
                for job in d.state.jobs:
                    statuses[name] = job.state.status
        if len(statuses) == len(rooms) and all(
            s in (agent.JS_SUCCESS, agent.JS_FAILED) for s in statuses.values()
        ):
            break
        await asyncio.sleep(0.1)
    return statuses
