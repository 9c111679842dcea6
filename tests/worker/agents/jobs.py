"""Entrypoints for the worker tests, importable by the zygote (module-level functions only).

`scripted` reads what to do from the job's metadata, a JSON object, so one entrypoint serves
both executors and every scenario:

- `{"sleep": 2.0}`: run that many seconds, then return (JS_SUCCESS);
- `{"until": "/tmp/x"}`: run until that file exists (the test releases the job);
- `{"raise": "boom"}`: raise (JS_FAILED);
- `{"burn": 0.15, ...}`: keep that share of a core busy (CPU time, in BURN_PERIOD_S slices)
  while doing what the rest of the script says;
- `{"close_s": 1.0, ...}`: a shutdown callback that takes that long (saving a transcript, say);
- `{"die_closing": true, ...}`: a shutdown callback that SIGKILLs its process (PROCESS only);
- anything else, or no metadata: run until terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any, Final

from callboard import JobContext, JobProcess

POLL_S: Final = 0.02
BURN_PERIOD_S: Final = 0.1


def job_script(job_metadata: str) -> dict[str, Any]:
    try:
        script = json.loads(job_metadata) if job_metadata else {}
    except ValueError:
        return {}
    return script if isinstance(script, dict) else {}


def script(**what: Any) -> str:
    """The metadata for a `scripted` job."""
    return json.dumps(what)


async def scripted(ctx: JobContext) -> None:
    what = job_script(ctx.job.metadata)
    add_closing_acts(ctx, what)
    if "burn" in what:
        burner = asyncio.create_task(burn(float(what["burn"])))
        try:
            await act(what)
        finally:
            burner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await burner
        return
    await act(what)


async def burn(duty: float) -> None:
    """Busy `duty` of each BURN_PERIOD_S in CPU time on a fixed schedule, so the rate stays
    `duty` cores even when the machine is shared (the busy slice just takes longer)."""
    loop = asyncio.get_running_loop()
    next_slice = loop.time()
    while True:
        start = time.thread_time()
        while time.thread_time() - start < duty * BURN_PERIOD_S:
            pass
        next_slice += BURN_PERIOD_S
        await asyncio.sleep(max(0.0, next_slice - loop.time()))


def add_closing_acts(ctx: JobContext, what: dict[str, Any]) -> None:
    if "close_s" in what:

        async def slow_close(reason: str) -> None:
            await asyncio.sleep(float(what["close_s"]))

        ctx.add_shutdown_callback(slow_close)
    if what.get("die_closing"):

        async def die(reason: str) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        ctx.add_shutdown_callback(die)


async def act(what: dict[str, Any]) -> None:
    if "raise" in what:
        raise RuntimeError(str(what["raise"]))
    if "sleep" in what:
        await asyncio.sleep(float(what["sleep"]))
        return
    if "until" in what:
        path = str(what["until"])
        # A file written by the test has no event to wait on: poll it.
        while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(POLL_S)
        return
    await asyncio.Event().wait()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prewarmed"] = True
