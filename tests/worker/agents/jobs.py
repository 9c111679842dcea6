"""Entrypoints for the worker tests, importable by the zygote (module-level functions only).

`scripted` reads what to do from the job's metadata, a JSON object, so one entrypoint serves
both executors and every scenario:

- `{"sleep": 2.0}`: run that many seconds, then return (JS_SUCCESS);
- `{"until": "/tmp/x"}`: run until that file exists (the test releases the job);
- `{"raise": "boom"}`: raise (JS_FAILED);
- anything else, or no metadata: run until terminated.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Final

from callboard import JobContext, JobProcess

POLL_S: Final = 0.02


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
