"""The soak's agent, run as `python soak_agent.py start` (a real worker, PROCESS executor).

Each job reads what to do from its dispatch metadata, a JSON object, so that the harness knows
exactly which fault every job carries:

- `{"fault": "none", "seconds": 1.5}`: run that long, then return (JS_SUCCESS);
- `{"fault": "raise"}`: the entrypoint raises (JS_FAILED, "entrypoint raised ...");
- `{"fault": "sigkill"}`: wait; the harness SIGKILLs the job process (JS_FAILED, "killed by
  SIGKILL");
- `{"fault": "hang"}`: block the event loop until supervision kills the process as unresponsive;
- `{"fault": "hog"}`: allocate memory until the worker kills the process at job_memory_limit_mb.

Every job appends one JSON line at its start and, when it gets that far, one at its end to the
ledger file (CALLBOARD_SOAK_LEDGER), with the worker's label (CALLBOARD_SOAK_WORKER). Each job
also logs its own room token on purpose, as a careless agent would: the worker's log redaction
must keep it out of every log line.

Environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, LIVEKIT_AGENT_NAME, and
CALLBOARD_SOAK_HTTP_PORT for the worker's HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Final

from callboard import JobContext, WorkerOptions, cli

LEDGER_ENV: Final = "CALLBOARD_SOAK_LEDGER"
WORKER_LABEL_ENV: Final = "CALLBOARD_SOAK_WORKER"
HTTP_PORT_ENV: Final = "CALLBOARD_SOAK_HTTP_PORT"

UNRESPONSIVE_TIMEOUT_S: Final = 1.5
MEMORY_LIMIT_MB: Final = 160.0
HOG_STEP_BYTES: Final = 8 * 1024 * 1024
HOG_STEP_S: Final = 0.05
HOG_CAP_BYTES: Final = 1024 * 1024 * 1024
"""A hog stops growing here (the limit is far below; this only bounds a broken supervisor)."""
BLOCK_S: Final = 0.5
IDLE_PROCESSES: Final = 2
POOL_WINDOW_S: Final = 0.1

log = logging.getLogger("soak_agent")


def job_plan(metadata: str) -> dict[str, Any]:
    try:
        plan = json.loads(metadata) if metadata else {}
    except ValueError:
        return {}
    return plan if isinstance(plan, dict) else {}


def write_ledger(event: str, ctx: JobContext, plan: dict[str, Any], **more: Any) -> None:
    """One JSON line, appended with a single write (O_APPEND keeps lines whole)."""
    line = {
        "event": event,
        "job_id": ctx.job.id,
        "room": ctx.room_name,
        "fault": plan.get("fault", "none"),
        "seq": plan.get("seq"),
        "pid": os.getpid(),
        "worker": os.environ.get(WORKER_LABEL_ENV, ""),
        "t": time.time(),
        **more,
    }
    data = (json.dumps(line) + "\n").encode()
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def block_the_loop() -> None:
    while True:
        time.sleep(BLOCK_S)


async def entrypoint(ctx: JobContext) -> None:
    plan = job_plan(ctx.job.metadata)
    fault = plan.get("fault", "none")
    write_ledger("start", ctx, plan, token=ctx.info.token)
    log.info("soak job started", extra={"fault": fault, "room_token": ctx.info.token})
    if fault == "raise":
        write_ledger("end", ctx, plan, outcome="raise")
        raise RuntimeError(f"injected fault in job {plan.get('seq')}")
    if fault == "sigkill":
        await asyncio.Event().wait()
    if fault == "hang":
        block_the_loop()
    if fault == "hog":
        hog: list[bytes] = []
        while len(hog) * HOG_STEP_BYTES < HOG_CAP_BYTES:
            hog.append(b"\x01" * HOG_STEP_BYTES)
            await asyncio.sleep(HOG_STEP_S)
        await asyncio.Event().wait()
    await asyncio.sleep(float(plan.get("seconds", 0.5)))
    write_ledger("end", ctx, plan, outcome="returned")


def no_load() -> float:
    return 0.0


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            load_fnc=no_load,
            host="127.0.0.1",
            port=int(os.environ.get(HTTP_PORT_ENV, "0")),
            num_idle_processes=IDLE_PROCESSES,
            # a pool that does not grow after bursts: the harness compares descriptors and
            # memory at idle checkpoints, each with IDLE_PROCESSES warm processes
            idle_processes_window=POOL_WINDOW_S,
            unresponsive_timeout=UNRESPONSIVE_TIMEOUT_S,
            job_memory_limit_mb=MEMORY_LIMIT_MB,
            job_memory_warn_mb=MEMORY_LIMIT_MB / 2,
            status_interval=0.5,
            drain_timeout=30.0,
            shutdown_process_timeout=2.0,
        )
    )
