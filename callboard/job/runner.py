"""Runs one job inside its process or thread: entrypoint, shutdown, one outcome.

The outcome is JS_SUCCESS when the entrypoint returns (and, if it joined the room, the room
session ends) or the job is shut down; JS_FAILED with a reason when the entrypoint raises. On a
shutdown request while the entrypoint still runs, the entrypoint is cancelled at once and the
shutdown callbacks get a bounded time, so the final status goes out promptly.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from livekit.protocol import agent

from callboard.job.context import JobContext
from callboard.log import get_logger

log = get_logger("job")

Entrypoint = Callable[[JobContext], Awaitable[None]]


@dataclass(frozen=True)
class JobOutcome:
    """The one terminal status of a job, and why."""

    status: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == agent.JS_SUCCESS

    @property
    def status_name(self) -> str:
        return agent.JobStatus.Name(self.status)


SUCCESS = JobOutcome(agent.JS_SUCCESS)


def failed(error: str) -> JobOutcome:
    return JobOutcome(agent.JS_FAILED, error)


async def run_job(ctx: JobContext, entrypoint: Entrypoint, shutdown_timeout: float) -> JobOutcome:
    """Drive `entrypoint(ctx)` to its one outcome."""
    fields = ctx.log_context_fields
    entry: asyncio.Future[None] = asyncio.ensure_future(entrypoint(ctx))
    stop: asyncio.Future[Any] = asyncio.ensure_future(ctx.shutdown_requested.wait())
    outcome = SUCCESS
    try:
        await asyncio.wait({entry, stop}, return_when=asyncio.FIRST_COMPLETED)
        if entry.done():
            outcome = _entry_outcome(entry, fields)
            if outcome.ok and ctx.connected and not stop.done():
                # Like livekit-agents: a job that joined its room lives until the session ends.
                await stop
        else:
            entry.cancel()
            # asyncio.wait neither raises the entrypoint's error nor swallows our own cancel
            _, still = await asyncio.wait({entry}, timeout=shutdown_timeout)
            if still:
                log.warning(
                    "entrypoint ignored its cancellation; continuing the shutdown",
                    extra={**fields, "timeout_s": shutdown_timeout},
                )
    finally:
        stop.cancel()
    reason = ctx.shutdown_reason or ("entrypoint failed" if not outcome.ok else "job finished")
    await _run_shutdown_callbacks(ctx, reason, shutdown_timeout)
    try:
        async with asyncio.timeout(shutdown_timeout):
            await ctx.aclose()
    except Exception as e:
        log.warning("closing the job context failed", extra={**fields, "error": repr(e)})
    return outcome


def _entry_outcome(entry: asyncio.Future[None], fields: dict[str, object]) -> JobOutcome:
    if entry.cancelled():
        return failed("entrypoint was cancelled")
    exc = entry.exception()
    if exc is None:
        return SUCCESS
    tb = "".join(traceback.format_exception(exc))
    log.error(
        "entrypoint raised an exception, the job failed",
        extra={**fields, "error": repr(exc), "traceback": tb},
    )
    return failed(f"entrypoint raised {type(exc).__name__}: {exc}")


async def _run_shutdown_callbacks(ctx: JobContext, reason: str, timeout: float) -> None:
    callbacks = ctx.shutdown_callbacks
    if not callbacks:
        return
    try:
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(
                *(cb(reason) for cb in callbacks), return_exceptions=True
            )
    except TimeoutError:
        log.warning(
            "shutdown callbacks did not finish in time, abandoning them",
            extra={**ctx.log_context_fields, "timeout_s": timeout},
        )
        return
    for res in results:
        if isinstance(res, BaseException):
            log.error(
                "shutdown callback raised",
                extra={**ctx.log_context_fields, "error": repr(res)},
            )
