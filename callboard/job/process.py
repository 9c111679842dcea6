"""One supervised job process, seen from the worker: handshake, ping, memory, the stop ladders,
and exactly one outcome for each job it runs (one job, or up to `jobs_per_process` at once).

Liveness is a dead-man timer: every pong resets it, a late pong logs "unresponsive", a missed
deadline dumps the process's stacks to the log and kills it. Memory is sampled off the loop:
a warning above job_memory_warn_mb, a kill above job_memory_limit_mb. Stopping is a ladder:
Shutdown over IPC → exit within shutdown_process_timeout → stack dump → SIGKILL → reaped. A
process shared by several jobs is killed only for what concerns them all (a blocked loop, its
memory, a crash); a job in it that ignores its stop is failed and left until its neighbours end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

import psutil

from callboard.job import ipc
from callboard.job.child import STACK_DUMP_SIGNAL, stack_dump_path
from callboard.job.context import RunningJobInfo
from callboard.job.ipc import LogRecordMsg
from callboard.job.runner import JobOutcome, failed
from callboard.log import get_logger

log = get_logger("job.process")

PING_INTERVAL_S: Final = 2.5
MEMORY_SAMPLE_INTERVAL_S: Final = 2.5
STACK_DUMP_WAIT_S: Final = 0.2
DRAIN_AFTER_EXIT_S: Final = 5.0
"""After a process exits, how long its last frames (JobDone, logs) may take to be read."""
MB: Final = 1024 * 1024


@dataclass(frozen=True)
class SupervisionLimits:
    ping_interval: float = PING_INTERVAL_S
    unresponsive_timeout: float = 10.0
    """A process whose loop has not answered a ping for this long is killed."""
    memory_interval: float = MEMORY_SAMPLE_INTERVAL_S
    memory_warn_mb: float = 500.0
    memory_limit_mb: float = 0.0
    initialize_timeout: float = 10.0
    shutdown_timeout: float = 10.0


def describe_exit(code: int) -> str:
    """A readable exit status with a hint for the usual suspects."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        hint = " (out of memory, or killed from outside?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


class HostedJob:
    """One job in a job process, seen from the worker: its own outcome, its own stop."""

    def __init__(self, process: JobProcessHandle, info: RunningJobInfo) -> None:
        self.process = process
        self._info = info
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[JobOutcome] = loop.create_future()
        self._known: asyncio.Future[JobOutcome] = loop.create_future()
        self.stop_requested = False

    @property
    def info(self) -> RunningJobInfo:
        return self._info

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def memory_mb(self) -> float | None:
        """Its share of its process's PSS."""
        return self.process.memory_share_mb

    @property
    def done(self) -> bool:
        return self._done.done()

    @property
    def fields(self) -> dict[str, Any]:
        return {
            "pid": self.process.pid,
            "job_id": self._info.job.id,
            "room": self._info.job.room.name,
        }

    def terminate(self, reason: str) -> None:
        self.process.stop_job(self, reason)

    async def wait(self) -> JobOutcome:
        return await asyncio.shield(self._done)

    async def wait_outcome(self) -> JobOutcome:
        return await asyncio.shield(self._known)

    async def wait_exit(self) -> int:
        return await self.process.wait_exit()

    def outcome_known(self, outcome: JobOutcome) -> None:
        """The job process knows the outcome; the job still closes (ipc.JobEnding)."""
        if not self._known.done():
            self._known.set_result(outcome)

    def resolve(self, outcome: JobOutcome) -> None:
        self.outcome_known(outcome)
        if not self._done.done():
            self._done.set_result(outcome)


class JobProcessHandle:
    """A forked job process: idle after its handshake, then up to `capacity` jobs at once, and
    gone after its last one ends (it takes no new job once empty)."""

    def __init__(
        self, pid: int, sock: socket.socket, limits: SupervisionLimits, capacity: int = 1
    ) -> None:
        self.pid = pid
        self.capacity = capacity
        self._sock = sock
        self._limits = limits
        loop = asyncio.get_running_loop()
        self._channel: ipc.FrameProtocol | None = None
        self._channel_closed: asyncio.Future[None] = loop.create_future()
        self._initialized: asyncio.Future[str] = loop.create_future()
        self._exit_code: asyncio.Future[int] = loop.create_future()
        self._finished: asyncio.Future[None] = loop.create_future()
        self._kill_reason: str | None = None
        self._last_pong = time.monotonic()
        self._warned_memory = False
        self.memory: MemoryUsage | None = None
        """The last memory sample (every memory_interval, off the loop)."""
        self._jobs: dict[str, HostedJob] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._closed_to_jobs = False
        """No new job: the process is stopping, emptied, or holds a job that ignored its stop."""
        self._abandoned = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def fields(self) -> dict[str, Any]:
        running = self.running
        if len(running) == 1:
            return running[0].fields
        out: dict[str, Any] = {"pid": self.pid}
        if running:
            out["job_ids"] = [j.info.job.id for j in running]
        return out

    @property
    def running(self) -> list[HostedJob]:
        """Its jobs without an outcome yet."""
        return [j for j in self._jobs.values() if not j.done]

    @property
    def alive(self) -> bool:
        return not self._exit_code.done()

    @property
    def idle(self) -> bool:
        return not self._jobs and self._initialized.done() and self.alive and not self._stopping

    @property
    def free_slots(self) -> int:
        """Jobs it may still take beside the ones it runs (0 once emptied or stopping)."""
        if not self.alive or self._closed_to_jobs or self._stopping:
            return 0
        return max(0, self.capacity - len(self.running))

    async def start(self) -> None:
        """Open the channel and wait for the handshake (prewarm) within initialize_timeout."""
        _, self._channel = await asyncio.get_running_loop().create_unix_connection(
            lambda: ipc.FrameProtocol(self._on_message, self._on_channel_closed), sock=self._sock
        )
        try:
            async with asyncio.timeout(self._limits.initialize_timeout):
                error = await asyncio.shield(self._initialized)
        except TimeoutError:
            error = f"not initialized within {self._limits.initialize_timeout:g}s"
            self.kill(error)
        if error:
            raise ProcessInitError(error)
        self._spawn(self._ping_task(), "ping")
        self._spawn(self._memory_task(), "memory")

    @property
    def memory_mb(self) -> float | None:
        """PSS in MB at the last sample, None before the first (what the warm pool's memory
        budget counts)."""
        return self.memory.pss_mb if self.memory is not None else None

    @property
    def memory_share_mb(self) -> float | None:
        """Each running job's share of the PSS (what the worker's cost model counts)."""
        mb = self.memory_mb
        return None if mb is None else mb / max(1, len(self.running))

    def host(self, info: RunningJobInfo) -> HostedJob:
        """Start `info`'s job in this process."""
        job = HostedJob(self, info)
        self._jobs[info.job.id] = job
        self._send(ipc.StartJob.of(info))
        return job

    def terminate(self, reason: str) -> None:
        """Stop the process: each of its jobs if it runs any, else the process itself."""
        running = self.running
        if running:
            for job in running:
                self.stop_job(job, reason)
            return
        if self._stopping or self._exit_code.done():
            return
        self._stopping = True
        self._send(ipc.Shutdown(reason))
        self._spawn(self._stop_ladder(), "stop-ladder")

    def stop_job(self, job: HostedJob, reason: str) -> None:
        """Ask one job to stop, once; its ladder escalates if it does not within
        shutdown_timeout."""
        if job.done or job.stop_requested or self._exit_code.done():
            return
        job.stop_requested = True
        self._send(ipc.Shutdown(reason, job.info.job.id))
        self._spawn(self._job_stop_ladder(job), "stop-ladder")

    def exited(self, code: int) -> None:
        """The zygote reaped this process; resolve once its last frames are read."""
        if not self._exit_code.done():
            self._exit_code.set_result(code)
        if not self._initialized.done():
            self._initialized.set_result(describe_exit(code))
        if self._channel is None or self._channel_closed.done():
            self._finish(code)
        else:
            self._spawn(self._finish_after_drain(code), "resolve")

    async def _finish_after_drain(self, code: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_AFTER_EXIT_S):
                await asyncio.shield(self._channel_closed)
        self._finish(code)

    def _on_channel_closed(self, error: Exception | None) -> None:
        if error is not None:
            log.error(
                "bad frame from a job process, killing it",
                extra={**self.fields, "error": str(error)},
            )
            self.kill(f"protocol error: {error}")
        if not self._channel_closed.done():
            self._channel_closed.set_result(None)

    def kill(self, reason: str) -> None:
        """SIGKILL now; the jobs it still runs fail with `reason`."""
        if self._kill_reason is None:
            self._kill_reason = reason
            if len(self.running) > 1:
                log.error(
                    "killing a job process that runs several jobs: they all fail",
                    extra={**self.fields, "reason": reason},
                )
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._exit_code.done():
            self._finish(self._exit_code.result())
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        with contextlib.suppress(OSError):
            stack_dump_path(self.pid).unlink()

    async def wait_exit(self) -> int:
        return await asyncio.shield(self._exit_code)

    async def wait_finished(self) -> None:
        """Until it exited and each of its jobs has its outcome."""
        await asyncio.shield(self._finished)

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"{name}-{self.pid}"))

    def _send(self, msg: ipc.Message) -> None:
        if self._channel is not None:
            self._channel.send(msg)

    def _finish(self, code: int) -> None:
        if self._finished.done():
            return
        for job in self.running:
            job.resolve(failed(self._kill_reason or f"job process {describe_exit(code)}"))
        self._finished.set_result(None)

    def _on_message(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Pong):
            self._last_pong = time.monotonic()
        elif isinstance(msg, ipc.LogRecordMsg):
            self._relay_log(msg)
        elif isinstance(msg, ipc.Initialized):
            if not self._initialized.done():
                self._initialized.set_result(msg.error)
        elif isinstance(msg, ipc.JobEnding):
            if (job := self._jobs.get(msg.job_id)) is not None:
                job.outcome_known(JobOutcome(msg.status, msg.error))
        elif isinstance(msg, ipc.JobDone):
            self._job_done(msg)

    def _job_done(self, msg: ipc.JobDone) -> None:
        job = self._jobs.get(msg.job_id)
        if job is None:
            log.warning("a job process reported an unknown job", extra={**self.fields})
            return
        if job.done:
            log.warning("a job failed for not stopping in time has now ended", extra=job.fields)
        job.resolve(JobOutcome(msg.status, msg.error))
        if self.running:
            return
        # emptied: it takes no more jobs, and hanging up is what lets it exit
        self._closed_to_jobs = True
        if self._abandoned:
            self.kill("its jobs ended")
            return
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        self._spawn(self._stop_ladder(), "exit-ladder")

    def _relay_log(self, msg: LogRecordMsg) -> None:
        extra = {**self.fields, **msg.extra}
        if "job_id" in msg.extra:
            extra.pop("job_ids", None)
        if msg.exc_text:
            extra["exc_text"] = msg.exc_text
        logging.getLogger(msg.logger).log(msg.level, msg.message, extra=_safe_extra(extra))

    async def _ping_task(self) -> None:
        limits = self._limits
        interval = min(limits.ping_interval, limits.unresponsive_timeout / 4)
        while self.alive:
            self._send(ipc.Ping(time.time()))
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_pong
            if silent > limits.unresponsive_timeout:
                await self._kill_unresponsive(silent)
                return
            if silent > 2 * interval:
                log.warning(
                    "job process is unresponsive",
                    extra={**self.fields, "silent_s": round(silent, 2)},
                )

    async def _kill_unresponsive(self, silent: float) -> None:
        reason = f"killed: unresponsive for {silent:.1f}s (event loop blocked?)"
        await self._dump_stacks(reason)
        self.kill(reason)

    async def _dump_stacks(self, why: str) -> None:
        path = stack_dump_path(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, STACK_DUMP_SIGNAL)
            await asyncio.sleep(STACK_DUMP_WAIT_S)
        try:
            stacks = path.read_text()
        except OSError:
            stacks = "(no stack dump available)"
        log.error(
            "job process stacks before kill", extra={**self.fields, "why": why, "stacks": stacks}
        )

    async def _memory_task(self) -> None:
        loop = asyncio.get_running_loop()
        limits = self._limits
        while self.alive:
            await asyncio.sleep(limits.memory_interval)
            self.memory = await loop.run_in_executor(None, memory_usage, self.pid)
            if self.memory is None:
                continue
            mb = self.memory.uss_mb
            jobs = max(1, len(self.running))
            if limits.memory_limit_mb and mb > limits.memory_limit_mb * jobs:
                limit = f"{limits.memory_limit_mb:g}" + (f" x {jobs} jobs" if jobs > 1 else "")
                reason = f"killed: memory {mb:.0f} MB over job_memory_limit_mb {limit}"
                log.error(
                    "job process over its memory limit",
                    extra={**self.fields, "memory_mb": round(mb, 1)},
                )
                self.kill(reason)
                return
            warn_mb = limits.memory_warn_mb * jobs
            if warn_mb and mb > warn_mb and not self._warned_memory:
                self._warned_memory = True
                log.warning(
                    "job process memory above job_memory_warn_mb",
                    extra={**self.fields, "memory_mb": round(mb, 1), "warn_mb": warn_mb},
                )

    async def _stop_ladder(self) -> None:
        """A process with no job left, asked to exit: SIGKILL if it does not within
        shutdown_timeout."""
        try:
            async with asyncio.timeout(self._limits.shutdown_timeout):
                await self.wait_exit()
        except TimeoutError:
            log.warning("job process did not exit when asked; killing it", extra=self.fields)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def _job_stop_ladder(self, job: HostedJob) -> None:
        """A job asked to stop that has no outcome within shutdown_timeout: its process is
        dumped and killed if the job is alone in it; beside other jobs it is failed and left
        there, and the process takes no new job and is killed once the others end."""
        timeout = self._limits.shutdown_timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await job.wait()
        if job.done:
            return
        reason = f"killed: did not stop within {timeout:g}s of shutdown"
        others = [j for j in self.running if j is not job]
        if not others:
            await self._dump_stacks(reason)
            self.kill(reason)
            return
        self._closed_to_jobs = self._abandoned = True
        log.error(
            "job did not stop; it is failed, and its process takes no new job and is killed "
            "once its other jobs end",
            extra={
                **job.fields,
                "timeout_s": timeout,
                "other_jobs": [j.info.job.id for j in others],
            },
        )
        job.resolve(
            failed(
                f"did not stop within {timeout:g}s of shutdown (left in a process shared with "
                f"{len(others)} other job(s), killed after them)"
            )
        )


class ProcessInitError(Exception):
    """A job process failed its handshake (prewarm raised, crashed, or timed out)."""


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _safe_extra(extra: dict[str, Any]) -> dict[str, Any]:
    return {(f"x_{k}" if k in _RESERVED else k): v for k, v in extra.items()}


@dataclass(frozen=True)
class MemoryUsage:
    """One process's memory: USS (its own pages, what the limits check) and PSS (its share of
    the pages it shares with the zygote and its siblings, what budgets add up)."""

    uss_mb: float
    pss_mb: float


def memory_usage(pid: int) -> MemoryUsage | None:
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None
    uss = float(info.uss) / MB
    return MemoryUsage(uss_mb=uss, pss_mb=float(getattr(info, "pss", info.uss)) / MB)
