"""livekit-agents' own JobContext, run by callboard's job engine (imported only for agents that
import livekit.agents; needs the `agents` extra).

`AgentsJobContext` IS-A `livekit.agents.JobContext`: every public member and every hook that
AgentSession, room IO, the plugins and the turn detector reach for (`_primary_agent_session`,
`session_directory`, `init_recording`, `_on_session_end`, ...) is livekit-agents' own code. This
module only does what livekit-agents' job process does around it (ipc/job_proc_lazy_main.py):
the context variable and the HTTP session context around the job, the room's disconnect as a
shutdown, and the shutdown sequence: session close, session report, leave the room, shutdown
callbacks, clean-up. The process, its supervision and the inference process stay callboard's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from livekit import rtc
from livekit.agents import job as lk_job
from livekit.agents.utils import aio, http_context

from callboard.job.context import JobExecutorType, RunningJobInfo
from callboard.job.runner import run_shutdown_callbacks
from callboard.log import get_logger

log = get_logger("job.agents")

NO_INFERENCE: Final = (
    "no inference runner is registered in this worker (plugins register theirs when imported)"
)


class _NoInference:
    """The executor of a worker with no inference runner: livekit-agents always hands one."""

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        raise RuntimeError(f"inference of {method} failed: {NO_INFERENCE}")


def new_job_process(executor_type: JobExecutorType) -> lk_job.JobProcess:
    """livekit-agents' JobProcess, for prewarm_fnc and `ctx.proc`."""
    return lk_job.JobProcess(
        executor_type=lk_job.JobExecutorType(executor_type.value),
        user_arguments=None,
        http_proxy=None,
    )


def _their_info(info: RunningJobInfo) -> lk_job.RunningJobInfo:
    args = info.accept_arguments
    return lk_job.RunningJobInfo(
        accept_arguments=lk_job.JobAcceptArguments(
            args.name, args.identity, args.metadata, args.attributes
        ),
        job=info.job,
        url=info.url,
        token=info.token,
        worker_id=info.worker_id,
        fake_job=info.fake_job,
        received_at=info.received_at,
        accepted_at=info.accepted_at,
        assigned_at=info.assigned_at,
        launched_at=time.time(),
    )


class AgentsJobContext(lk_job.JobContext):
    """livekit-agents' JobContext, with the few members callboard's runner drives it by."""

    def __init__(
        self, *, proc: lk_job.JobProcess, info: RunningJobInfo, inference_executor: Any | None
    ) -> None:
        self._cb_stop = asyncio.Event()
        self._cb_reason = ""
        room = rtc.Room()
        room._info.name = info.job.room.name  # what livekit-agents' job process does too
        super().__init__(
            proc=proc,
            info=_their_info(info),
            room=room,
            on_connect=lambda: None,
            on_shutdown=lambda reason: self._cb_request_stop(reason or "user requested"),
            inference_executor=inference_executor or _NoInference(),
        )
        room.on("disconnected", lambda *_: self._cb_request_stop("room disconnected"))

    def _cb_request_stop(self, reason: str) -> None:
        if not self._cb_stop.is_set():
            self._cb_reason = reason
            self._cb_stop.set()

    # -- what callboard's runner drives (runner.RunnableJob) ------------------------------------

    @property
    def job_fields(self) -> dict[str, Any]:
        return {"job_id": self.job.id, "room": self.job.room.name, "pid": os.getpid()}

    @property
    def shutdown_requested(self) -> asyncio.Event:
        return self._cb_stop

    @property
    def shutdown_reason(self) -> str:
        return self._cb_reason

    @property
    def connected(self) -> bool:
        return self._connected

    @contextlib.asynccontextmanager
    async def job_scope(self) -> AsyncIterator[None]:
        """livekit-agents' job context variable and HTTP session context, set before the
        entrypoint starts (so its tasks inherit them) and cleared once the job is closed."""
        self._on_setup()
        self._start_log_buffering()
        self._prepare_telemetry()
        token = lk_job._JobContextVar.set(self)
        http_context._new_session_ctx()
        try:
            yield
        finally:
            try:
                if self._pending_tasks:
                    await aio.cancel_and_wait(*self._pending_tasks)
                await self._on_cleanup()
            finally:
                await http_context._close_http_ctx()
                lk_job._JobContextVar.reset(token)

    async def close_job(self, reason: str, timeout: float) -> None:
        """livekit-agents' shutdown order: the primary AgentSession closes, its report is
        made, the agent leaves the room, then the shutdown callbacks run (each step bounded)."""
        fields = self.job_fields
        if (session := self._primary_agent_session) is not None:
            try:
                async with asyncio.timeout(timeout):
                    await session.aclose()
            except TimeoutError:
                log.error("AgentSession.aclose() timed out", extra={**fields, "timeout_s": timeout})
        try:
            await self._on_session_end()
        except Exception as e:
            log.error("session end handling failed", extra={**fields, "error": repr(e)})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._room.disconnect()
        await run_shutdown_callbacks(self._shutdown_callbacks, reason, timeout, fields)
