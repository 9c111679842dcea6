"""The callboard agent the cluster tests run as a fleet: `python fleet_agent.py start`.

Each job is a call: it appends `start` to FLEET_RECORD, holds for `hold` seconds from the job's
metadata (a JSON object; absent or null: until terminated), appends `done` and returns. Its
shutdown callback appends `shutdown` with the reason, so a call that ended without `done` was
cut short. Every line carries the worker's label (FLEET_LABEL) and the worker id the job came
from. The load it reports is its running jobs over FLEET_MAX_JOBS (also its hard cap), so the
reported load is exact and checkable instead of this shared machine's CPU (FLEET_FIXED_LOAD
pins it instead, as the interop agents' zero load does). Connection settings
come from LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET and LIVEKIT_AGENT_NAME; the HTTP
server listens on 127.0.0.1:FLEET_HTTP_PORT; a drain waits FLEET_DRAIN_S at most.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from callboard import JobContext, Worker, WorkerOptions, cli

RECORD_ENV = "FLEET_RECORD"
LABEL_ENV = "FLEET_LABEL"
MAX_JOBS_ENV = "FLEET_MAX_JOBS"
HTTP_PORT_ENV = "FLEET_HTTP_PORT"
DRAIN_ENV = "FLEET_DRAIN_S"
FIXED_LOAD_ENV = "FLEET_FIXED_LOAD"
FULL_AT_THE_CAP = 1.0
"""FULL from max_jobs (at once) rather than from a load threshold: the worker adds a reservation
for jobs started in the last 2.5 s to the measured load (made for a CPU measure that cannot see
them yet), and a job-count load already counts them, so the effective load runs ahead."""


def record(event: str, ctx: JobContext, **more: Any) -> None:
    """One JSON line, one O_APPEND write: lines of concurrent jobs do not mix."""
    line = {
        "event": event,
        "job_id": ctx.job.id,
        "dispatch_id": ctx.job.dispatch_id,
        "room": ctx.room_name,
        "worker": os.environ.get(LABEL_ENV, ""),
        "worker_id": ctx.worker_id,
        "time": time.time(),
        **more,
    }
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


async def entrypoint(ctx: JobContext) -> None:
    async def on_shutdown(reason: str) -> None:
        record("shutdown", ctx, reason=reason)

    ctx.add_shutdown_callback(on_shutdown)
    record("start", ctx, pid=os.getpid())
    try:
        hold = json.loads(ctx.job.metadata or "{}").get("hold")
    except (ValueError, AttributeError):
        hold = None
    if isinstance(hold, (int, float)):
        await asyncio.sleep(hold)
        record("done", ctx)
    else:
        await asyncio.Event().wait()


def max_jobs() -> int:
    return int(os.environ.get(MAX_JOBS_ENV, "4"))


def job_load(worker: Worker) -> float:
    """Running jobs over the cap (0 idle, 1 full), or FLEET_FIXED_LOAD when set."""
    fixed = os.environ.get(FIXED_LOAD_ENV)
    return float(fixed) if fixed else len(worker.active_jobs) / max_jobs()


def options() -> WorkerOptions:
    return WorkerOptions(
        entrypoint_fnc=entrypoint,
        load_fnc=job_load,
        max_jobs=max_jobs(),
        load_threshold=FULL_AT_THE_CAP,
        host="127.0.0.1",
        port=int(os.environ.get(HTTP_PORT_ENV, "0")),
        num_idle_processes=1,
        drain_timeout=float(os.environ.get(DRAIN_ENV, "30")),
        shutdown_process_timeout=3.0,
    )


if __name__ == "__main__":
    cli.run_app(options())
