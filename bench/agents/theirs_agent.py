"""The benchmark agent, livekit-agents 1.8.9 side (`ours_agent.py` differs only in its import).

    BENCH_RECORD=jobs.jsonl BENCH_AGENT_NAME=bench LIVEKIT_URL=ws://127.0.0.1:7880 \\
    LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret python bench/agents/theirs_agent.py start

The entrypoint needs no media (it never calls `ctx.connect()`: callboard server has no /rtc):
it appends `{"job_id", "metadata", "time": time.time(), "pid"}` to BENCH_RECORD as its first
act, runs a full `gc.collect()` if the job metadata (a JSON object) says `"gc": true` (what a
job that has run for a while has been through), then holds the job for `hold` seconds from the
metadata (absent or null: until the job is terminated) and ends it with `ctx.shutdown()`.

BENCH_LOAD_THRESHOLD, when set (a float, or `inf`), replaces the framework's load_threshold
default (0.7 in production, inf in dev). BENCH_ZERO_LOAD=1 reports a load of 0 instead of the
machine's CPU use: a worker reporting a load of 1.0 gets no job from the server whatever its
threshold (LiveKit's rule), and this machine's CPU is shared. BENCH_NUM_IDLE, when set,
replaces the framework's num_idle_processes default (the warm pool's size). The worker's HTTP
server listens on 127.0.0.1, on a free port, and a drain after SIGTERM waits at most 1 s for
running jobs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

from livekit.agents import JobContext, WorkerOptions, cli

RECORD_ENV = "BENCH_RECORD"
AGENT_NAME_ENV = "BENCH_AGENT_NAME"
LOAD_THRESHOLD_ENV = "BENCH_LOAD_THRESHOLD"
ZERO_LOAD_ENV = "BENCH_ZERO_LOAD"
NUM_IDLE_ENV = "BENCH_NUM_IDLE"
DRAIN_TIMEOUT_S = 1


async def entrypoint(ctx: JobContext) -> None:
    started = time.time()
    job = ctx.job
    line = json.dumps(
        {"job_id": job.id, "metadata": job.metadata, "time": started, "pid": os.getpid()}
    )
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    params = _params(job.metadata)
    if params.get("gc") is True:
        gc.collect()
    hold = params.get("hold")
    if isinstance(hold, (int, float)):
        await asyncio.sleep(hold)
    else:
        await asyncio.Event().wait()  # until the job is terminated
    ctx.shutdown("bench job done")


def _params(metadata: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def zero_load() -> float:
    return 0.0


def options() -> WorkerOptions:
    extra: dict[str, Any] = {}
    if os.environ.get(LOAD_THRESHOLD_ENV):
        extra["load_threshold"] = float(os.environ[LOAD_THRESHOLD_ENV])
    if os.environ.get(NUM_IDLE_ENV):
        extra["num_idle_processes"] = int(os.environ[NUM_IDLE_ENV])
    if os.environ.get(ZERO_LOAD_ENV) == "1":
        extra["load_fnc"] = zero_load
    return WorkerOptions(
        entrypoint_fnc=entrypoint,
        agent_name=os.environ.get(AGENT_NAME_ENV, ""),
        host="127.0.0.1",
        port=0,
        drain_timeout=DRAIN_TIMEOUT_S,
        **extra,
    )


if __name__ == "__main__":
    cli.run_app(options())
