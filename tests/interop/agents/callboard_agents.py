"""callboard agents for the interop tests: they record their jobs to a JSON-lines file."""

from __future__ import annotations

import asyncio
import json
import os
import time

from callboard import JobContext

RECORD_ENV = "CALLBOARD_INTEROP_RECORD"
HANG_UP_AFTER_S = 0.5


def _record(event: str, ctx: JobContext, **more: object) -> None:
    line = {"event": event, "job_id": ctx.job.id, "room": ctx.room_name, "t": time.time(), **more}
    with open(os.environ[RECORD_ENV], "a") as f:
        f.write(json.dumps(line) + "\n")


async def until_terminated(ctx: JobContext) -> None:
    """Runs until the job is terminated; records start and shutdown."""

    async def on_shutdown(reason: str) -> None:
        _record("shutdown", ctx, reason=reason)

    ctx.add_shutdown_callback(on_shutdown)
    _record("job", ctx, agent_name=ctx.job.agent_name, metadata=ctx.job.metadata)
    await asyncio.Event().wait()


async def brief(ctx: JobContext) -> None:
    """Runs about a second, then succeeds."""
    _record("job", ctx, agent_name=ctx.job.agent_name)
    await asyncio.sleep(1.0)
    _record("done", ctx)


async def hangs_up_itself(ctx: JobContext) -> None:
    """Joins its room, then ends its own job, as an agent's end-call tool does."""
    await ctx.connect()
    await asyncio.sleep(HANG_UP_AFTER_S)
    ctx.shutdown("call over")
