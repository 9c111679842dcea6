"""Runs one job inside its process or thread: entrypoint, shutdown, one outcome.

The outcome is JS_SUCCESS when the entrypoint returns (and, if it joined the room, the room
session ends) or the job is shut down; JS_FAILED with a reason when the entrypoint raises. On a
shutdown request while the entrypoint still runs, the entrypoint is cancelled at once and the
shutdown callbacks get a bounded time, so the final status goes out promptly.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from livekit.protocol import agent

from callboard.log import get_logger

log = get_logger("job")

Entrypoint = Callable[[Any], Awaitable[None]]


class RunnableJob(Protocol):
    """What run_job drives: callboard's JobContext, or livekit-agents' through the bridge."""

    @property
    def job_fields(self) -> dict[str, Any]:
        """job_id, room, pid: what the job engine's log lines carry."""
        ...

    @property
    def shutdown_requested(self) -> asyncio.Event: ...

    @property
    def shutdown_reason(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def shutdown(self, reason: str = ...) -> None: ...

    def job_scope(self) -> AbstractAsyncContextManager[None]:
        """Entered before the entrypoint starts, left after the job is closed."""
        ...

    async def close_job(self, reason: str, timeout: float) -> None:
        """Everything after the entrypoint: sessions, callbacks, the room, clients."""


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


async def run_job(
    ctx: RunnableJob,
    entrypoint: Entrypoint,
    shutdown_timeout: float,
    on_outcome: Callable[[JobOutcome], None] | None = None,
) -> JobOutcome:
    """Drive `entrypoint(ctx)` to its one outcome. `on_outcome` gets it as soon as it is
    known, before the job closes (its session, its room, its shutdown callbacks), which does
    not change it."""
    async with ctx.job_scope():
        outcome, reason = await _run_entrypoint(ctx, entrypoint, shutdown_timeout)
        if on_outcome is not None:
            on_outcome(outcome)
        try:
            await ctx.close_job(reason, shutdown_timeout)
        except Exception as e:
            fields = {**ctx.job_fields, "error": repr(e)}
            log.warning("closing the job context failed", extra=fields)
    return outcome


async def _run_entrypoint(
    ctx: RunnableJob, entrypoint: Entrypoint, shutdown_timeout: float
) -> tuple[JobOutcome, str]:
    """The entrypoint's outcome, once it has returned (and a job that joined its room has been
    asked to shut down), or once a shutdown cancelled it; and the shutdown reason."""
    fields = ctx.job_fields
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
    return outcome, reason


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


async def run_shutdown_callbacks(
    callbacks: Iterable[Callable[[str], Coroutine[None, None, None]]],
    reason: str,
    timeout: float,
    fields: dict[str, Any],
) -> None:
    """Run the job's shutdown callbacks together, each given the reason, within `timeout`."""
    pending = [cb(reason) for cb in callbacks]
    if not pending:
        return
    try:
        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*pending, return_exceptions=True)
    except TimeoutError:
        log.warning(
            "shutdown callbacks did not finish in time, abandoning them",
            extra={**fields, "timeout_s": timeout},
        )
        return
    for res in results:
        if isinstance(res, BaseException):
            log.error("shutdown callback raised", extra={**fields, "error": repr(res)})
