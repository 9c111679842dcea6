"""One supervised job process, seen from the worker: handshake, ping, memory, the stop ladder,
and exactly one outcome.

Liveness is a dead-man timer: every pong resets it, a late pong logs "unresponsive", a missed
deadline dumps the process's stacks to the log and kills it. Memory is sampled off the loop:
a warning above job_memory_warn_mb, a kill above job_memory_limit_mb. Stopping is a ladder:
Shutdown over IPC → exit within shutdown_process_timeout → stack dump → SIGKILL → reaped.
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
from callboard.job.child import EXIT_PREWARM_FAILED, STACK_DUMP_SIGNAL, stack_dump_path
from callboard.job.context import RunningJobInfo
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


class JobProcessHandle:
    """A forked job process: idle after its handshake, then one job, then gone."""

    def __init__(self, pid: int, sock: socket.socket, limits: SupervisionLimits) -> None:
        self.pid = pid
        self._sock = sock
        self._limits = limits
        loop = asyncio.get_running_loop()
        self._channel: ipc.FrameProtocol | None = None
        self._channel_closed: asyncio.Future[None] = loop.create_future()
        self._initialized: asyncio.Future[str] = loop.create_future()
        self._exit_code: asyncio.Future[int] = loop.create_future()
        self._done: asyncio.Future[JobOutcome] = loop.create_future()
        self._reported: JobOutcome | None = None
        self._kill_reason: str | None = None
        self._last_pong = time.monotonic()
        self._warned_memory = False
        self.memory: MemoryUsage | None = None
        """The last memory sample (every memory_interval, off the loop)."""
        self._info: RunningJobInfo | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False

    # -- RunningJob protocol ------------------------------------------------------------------

    @property
    def info(self) -> RunningJobInfo:
        assert self._info is not None
        return self._info

    async def wait(self) -> JobOutcome:
        return await asyncio.shield(self._done)

    def terminate(self, reason: str) -> None:
        if self._stopping or self._exit_code.done():
            return
        self._stopping = True
        self._send(ipc.Shutdown(reason))
        self._spawn(self._stop_ladder(), "stop-ladder")

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid}
        if self._info is not None:
            out.update(job_id=self._info.job.id, room=self._info.job.room.name)
        return out

    @property
    def alive(self) -> bool:
        return not self._exit_code.done()

    @property
    def idle(self) -> bool:
        return self._info is None and self._initialized.done() and self.alive

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
        """PSS in MB at the last sample, None before the first (what the worker's cost model
        and the warm pool's memory budget count)."""
        return self.memory.pss_mb if self.memory is not None else None

    def launch(self, info: RunningJobInfo) -> None:
        self._info = info
        self._send(ipc.StartJob.of(info))

    def exited(self, code: int) -> None:
        """The zygote reaped this process; resolve once its last frames are read."""
        if not self._exit_code.done():
            self._exit_code.set_result(code)
        if not self._initialized.done():
            self._initialized.set_result(describe_exit(code))
        if self._channel is None or self._channel_closed.done():
            self._resolve(code)
        else:
            self._spawn(self._resolve_after_drain(code), "resolve")

    async def _resolve_after_drain(self, code: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_AFTER_EXIT_S):
                await asyncio.shield(self._channel_closed)
        self._resolve(code)

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
        """SIGKILL now; the outcome says `reason`."""
        if self._kill_reason is None:
            self._kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        with contextlib.suppress(OSError):
            stack_dump_path(self.pid).unlink()

    async def wait_exit(self) -> int:
        return await asyncio.shield(self._exit_code)

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"{name}-{self.pid}"))

    def _send(self, msg: ipc.Message) -> None:
        if self._channel is not None:
            self._channel.send(msg)

    def _resolve(self, code: int) -> None:
        if self._done.done():
            return
        if self._kill_reason is not None:
            outcome = failed(self._kill_reason)
        elif self._reported is not None:
            outcome = self._reported
        elif self._info is None:
            why = "prewarm_fnc failed" if code == EXIT_PREWARM_FAILED else describe_exit(code)
            outcome = failed(f"job process {why} before starting the job")
        else:
            outcome = failed(f"job process {describe_exit(code)}")
        self._done.set_result(outcome)

    def _on_message(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Pong):
            self._last_pong = time.monotonic()
        elif isinstance(msg, ipc.LogRecordMsg):
            self._relay_log(msg)
        elif isinstance(msg, ipc.Initialized):
            if not self._initialized.done():
                self._initialized.set_result(msg.error)
        elif isinstance(msg, ipc.JobDone):
            self._reported = JobOutcome(msg.status, msg.error)
            # hanging up is the acknowledgement the process waits for before it exits
            if self._channel is not None and self._channel.transport is not None:
                self._channel.transport.close()

    def _relay_log(self, msg: ipc.LogRecordMsg) -> None:
        extra = {**msg.extra, **self.fields}
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
            if limits.memory_limit_mb and mb > limits.memory_limit_mb:
                limit = limits.memory_limit_mb
                reason = f"killed: memory {mb:.0f} MB over job_memory_limit_mb {limit:g}"
                log.error(
                    "job process over its memory limit",
                    extra={**self.fields, "memory_mb": round(mb, 1)},
                )
                self.kill(reason)
                return
            if limits.memory_warn_mb and mb > limits.memory_warn_mb and not self._warned_memory:
                self._warned_memory = True
                log.warning(
                    "job process memory above job_memory_warn_mb",
                    extra={
                        **self.fields,
                        "memory_mb": round(mb, 1),
                        "warn_mb": limits.memory_warn_mb,
                    },
                )

    async def _stop_ladder(self) -> None:
        try:
            async with asyncio.timeout(self._limits.shutdown_timeout):
                await self.wait_exit()
            return
        except TimeoutError:
            pass
        reason = f"killed: did not stop within {self._limits.shutdown_timeout:g}s of shutdown"
        await self._dump_stacks(reason)
        if self._reported is None:
            self.kill(reason)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


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
