"""One phone call with media through a server (the real livekit-server or `callboard server`),
run by tests/interop/test_media.py as `python -m tests.interop.media_call WORKDIR [KIND]` in a
process of its own.

The process first moves into a private network namespace (tests/interop/netns.py: WebRTC needs a
non-loopback address, and the namespace keeps all traffic inside the machine). Then it starts
the server KIND (HTTP on 127.0.0.1, media on MEDIA_IP) and a callboard Worker with the PROCESS
executor running tests/interop/agents/media_agent.py, creates the SIP-style room
`call-_+56975231235_<12 base57>` (automatic dispatch to the worker), and plays the caller: an rtc
client with identity `sip_+56975231235`, kind SIP and the gateway's sip.* attributes, which
publishes a tone and listens to the agent's. Once both sides heard each other it hangs up and
watches the job end on the worker and on the server.

Output in WORKDIR: report.json (what happened, read by the test), agent.jsonl (the agent's
report lines), KIND-*.log; the process's stderr carries the worker's JSON log lines
(job logs relayed with job_id, room and pid). Exit status SKIP_EXIT when the namespace cannot
be had (report.json says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import psutil
from livekit import api, rtc
from livekit.protocol import agent

from callboard import JobExecutorType, Worker, WorkerOptions
from callboard.log import setup_logging
from callboard.worker.worker import ActiveJob
from tests.interop.agents import media_agent
from tests.interop.call_process import against_server, call_script_main
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    HOST,
    ServerProcess,
)
from tests.interop.netns import MEDIA_IP
from tests.interop.support import wait_until

AGENT_REPORT_FILE: Final = "agent.jsonl"

CALLER_NUMBER: Final = "+56975231235"
CALLER_IDENTITY: Final = f"sip_{CALLER_NUMBER}"
ROOM_PREFIX: Final = f"call-_{CALLER_NUMBER}_"
BASE57: Final = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
"""The alphabet of LiveKit's random ids (shortuuid)."""

REGISTER_TIMEOUT_S: Final = 30.0
JOB_START_TIMEOUT_S: Final = 15.0
MEDIA_TIMEOUT_S: Final = 20.0
JOB_END_TIMEOUT_S: Final = 15.0
SERVER_END_TIMEOUT_S: Final = 10.0
REAP_TIMEOUT_S: Final = 10.0
CALL_TIMEOUT_S: Final = 80.0
SHUTDOWN_PROCESS_TIMEOUT_S: Final = 5.0


def base57(n: int) -> str:
    return "".join(secrets.choice(BASE57) for _ in range(n))


def sip_attributes() -> dict[str, str]:
    """What LiveKit's SIP gateway sets on an inbound caller (numbers and ids are made up)."""
    return {
        "sip.callID": f"SCL_{base57(12)}",
        "sip.trunkID": f"ST_{base57(12)}",
        "sip.ruleID": f"SDR_{base57(12)}",
        "sip.phoneNumber": CALLER_NUMBER,
        "sip.trunkPhoneNumber": "+15550100123",
        "sip.hostname": "callboard-media-test",
        "sip.callStatus": "active",
    }


def caller_token(room: str, attributes: dict[str, str]) -> str:
    grants = api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_identity(CALLER_IDENTITY)
        .with_name(CALLER_NUMBER)
        .with_kind("sip")
        .with_attributes(attributes)
        .with_grants(grants)
        .to_jwt()
    )


class Caller:
    """The phone side: an rtc client that says its tone and counts the agent's."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.heard = media_agent.ToneMeter()
        self._source: rtc.AudioSource | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def dial(self, url: str, token: str) -> None:
        await self.room.connect(url, token)
        self._source = await media_agent.publish_voice(self.room, "caller-mic")
        self._tasks = [
            asyncio.create_task(media_agent.speak(self._source, media_agent.CALLER_TONE_HZ)),
            asyncio.create_task(media_agent.listen(self.room, self.heard)),
        ]

    async def hang_up(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.room.isconnected():
            await self.room.disconnect()
        if self._source is not None:
            await self._source.aclose()


def agent_events(path: Path, event: str) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r["event"] == event]


@asynccontextmanager
async def running_worker(
    server: ServerProcess, entrypoint: Callable[[Any], Awaitable[None]] = media_agent.entrypoint
) -> AsyncIterator[Worker]:
    opts = WorkerOptions(
        entrypoint_fnc=entrypoint,
        job_executor_type=JobExecutorType.PROCESS,
        ws_url=server.ws_url,
        api_key=API_KEY,
        api_secret=API_SECRET,
        host=HOST,
        port=0,
        load_fnc=lambda: 0.0,
        num_idle_processes=1,
        shutdown_process_timeout=SHUTDOWN_PROCESS_TIMEOUT_S,
    )
    worker = Worker(opts)
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(
            lambda: worker.registered or run.done(), "worker registration", REGISTER_TIMEOUT_S
        )
        if run.done():
            await run
        yield worker
    finally:
        await worker.aclose()
        await run


async def server_job_state(lk: api.LiveKitAPI, room: str) -> agent.JobState | None:
    for d in await lk.agent_dispatch.list_dispatch(room):
        for job in d.state.jobs:
            return job.state
    return None


def server_job_ended(server: ServerProcess, job_id: str) -> dict[str, Any] | None:
    """The server's `job ended` log record for `job_id` (both log JSON lines), if any, with
    livekit-server's field names (`jobID`, `workerID`, `status`, `error`)."""
    for line in server.log_path.read_text(errors="replace").splitlines():
        if job_id in line and '"job ended"' in line:
            record: dict[str, Any] = json.loads(line)
            if record.get("msg") == "job ended" and record.get("jobID") == job_id:
                return record
            if record.get("message") == "job ended" and record.get("job_id") == job_id:
                return {
                    "jobID": job_id,
                    "workerID": record.get("worker_id"),
                    "status": record.get("status"),
                    "error": record.get("error"),
                }
    return None


async def call(server: ServerProcess, workdir: Path, report: dict[str, Any]) -> None:
    agent_report = workdir / AGENT_REPORT_FILE
    async with (
        api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk,
        running_worker(server) as worker,
    ):
        report["worker_id"] = worker.id
        room = ROOM_PREFIX + base57(12)
        attributes = sip_attributes()
        report.update(room=room, caller_identity=CALLER_IDENTITY, sip_attributes=attributes)
        await lk.room.create_room(api.CreateRoomRequest(name=room))
        caller = Caller()
        try:
            await caller.dial(server.ws_url, caller_token(room, attributes))
            job: ActiveJob = await wait_until(
                lambda: worker.active_jobs[0] if worker.active_jobs else None,
                "the job to start on the worker",
                JOB_START_TIMEOUT_S,
            )
            report["job"] = {
                "id": job.info.job.id,
                "room": job.info.job.room.name,
                "pid": job.handle.pid,
                "url": job.info.url,
            }
            await wait_until(
                lambda: (
                    agent_events(agent_report, "heard")
                    and caller.heard.tone_frames >= media_agent.HEARD_TONE_FRAMES
                ),
                "both sides to hear each other's tone",
                MEDIA_TIMEOUT_S,
                lambda: f"caller heard {caller.heard.summary()}",
            )
        finally:
            report["caller_heard"] = caller.heard.summary()
            await caller.hang_up()
        hung_up = time.monotonic()
        await wait_until(
            lambda: not worker.active_jobs, "the job to end on the worker", JOB_END_TIMEOUT_S
        )
        outcome = await job.handle.wait()
        report["worker_view"] = {
            "active_jobs": len(worker.active_jobs),
            "handle_outcome": outcome.status_name,
            "handle_error": outcome.error,
            "recorded_outcome": job.outcome.status_name if job.outcome else None,
            "ended_after_hang_up_s": round(time.monotonic() - hung_up, 3),
        }

        # The real server (v1.13.5) logs the job's end, but its ListDispatch never shows it
        # (observed: JS_RUNNING, or no job at all): that view is only recorded.
        job_id = job.info.job.id
        ended = await wait_until(
            lambda: server_job_ended(server, job_id),
            "the server to log the job's end",
            SERVER_END_TIMEOUT_S,
            lambda: server.log_tail(),
        )
        listed = await server_job_state(lk, room)
        report["server_view"] = {
            "ended_log": ended,
            "listed_status": agent.JobStatus.Name(listed.status) if listed else None,
            "listed_ended_at": listed.ended_at if listed else None,
        }
    me = psutil.Process()
    with contextlib.suppress(AssertionError):
        await wait_until(
            lambda: not leftover_children(me, server), "job processes to be reaped", REAP_TIMEOUT_S
        )
    report["leftover_children"] = leftover_children(me, server)


def leftover_children(me: psutil.Process, server: ServerProcess) -> list[str]:
    out = []
    for p in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.pid != server.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())}")
    return out


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    kind = argv[2] if len(argv) > 2 else "livekit-server"
    report: dict[str, Any] = {"media_ip": MEDIA_IP}

    def run() -> None:
        setup_logging("json", logging.INFO)
        os.environ[media_agent.REPORT_ENV] = str(workdir / AGENT_REPORT_FILE)

        async def main_call(server: ServerProcess) -> None:
            await call(server, workdir, report)

        against_server(kind, workdir, report, main_call, CALL_TIMEOUT_S)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
