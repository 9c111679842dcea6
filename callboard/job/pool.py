"""PROCESS executor: a zygote that forks job processes, and a warm pool of prewarmed ones.

`launch` hands a job to an idle prewarmed process in O(1) when there is one, else forks a new
process from the zygote (milliseconds plus prewarm); the pool refills in the background. A
process runs one job by default; with `jobs_per_process` N > 1 a busy process takes further
jobs up to N at once (the fullest first), which shares one process's memory among calls at the
cost of their isolation, and its free places count toward the warm pool, so that no idle
process is kept for jobs a busy one will take. Every process is single-use: it exits once its
last job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from callboard.job import ipc
from callboard.job.context import RunningJobInfo
from callboard.job.inference import socket_name
from callboard.job.process import (
    HostedJob,
    JobProcessHandle,
    ProcessInitError,
    SupervisionLimits,
    describe_exit,
)
from callboard.job.zygote_client import ZygoteClient, ZygoteError
from callboard.log import get_logger

log = get_logger("job.pool")

MAX_CONSECUTIVE_INIT_FAILURES: Final = 5
"""After this many prewarm failures in a row the pool stops prefilling (no crash loop)."""
LAUNCH_ATTEMPTS: Final = 3
INFERENCE_READY_POLL_S: Final = 0.02
INFERENCE_START_TIMEOUT_S: Final = 300.0
"""How long the shared inference process may take to load its models (livekit-agents allows the
same 5 minutes): loading Whisper and a TTS voice took ~20 s on a loaded 2-core machine."""
IDLE_PSS_PRIOR_MB: Final = 25.0
"""PSS assumed for an idle process until one has been measured (a small agent's idle process
measures ~4 MB, one that imported livekit-agents and voice plugins in the zygote ~10-20 MB)."""
REFILL_QUIET_S: Final = 0.05
REFILL_MAX_DELAY_S: Final = 1.0
"""The warm pool refills once launches pause, and a steady stream of calls still gets a
refill at least this often."""


def _can_connect(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def idle_processes_for(jobs: int, free_places: int, jobs_per_process: int) -> int:
    """Idle processes that let `jobs` more jobs start without a fork when the processes already
    running jobs have `free_places` between them."""
    return math.ceil(max(0, jobs - free_places) / jobs_per_process)


def idle_within_budget(target: int, idle_pss_mb: float, budget_mb: float) -> int:
    """How many of `target` idle processes of `idle_pss_mb` each fit in `budget_mb` (0: no
    budget)."""
    if budget_mb <= 0 or idle_pss_mb <= 0:
        return target
    return min(target, int(budget_mb // idle_pss_mb))


def function_ref(fn: Callable[..., Any]) -> tuple[str, str, str]:
    """(module, file for __main__, qualname): how the zygote finds `fn` again."""
    module = fn.__module__
    path = ""
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", "") or ""
    return module, path, fn.__qualname__


class ProcessExecutor:
    """JobExecutor over zygote-forked, supervised, single-use processes."""

    def __init__(
        self,
        zygote_config: ipc.ZygoteConfig,
        limits: SupervisionLimits,
        warm_jobs: int,
        idle_memory_mb: float = 0.0,
        jobs_per_process: int = 1,
    ) -> None:
        self._zygote_config = zygote_config
        self._zygote = ZygoteClient(zygote_config, self._on_exit)
        self._retired: set[ZygoteClient] = set()
        self._limits = limits
        self._jobs_per_process = jobs_per_process
        self._warm_jobs = warm_jobs
        """Jobs that should be able to start without a fork (the worker's warm target)."""
        self._idle_memory_mb = idle_memory_mb
        """Total PSS the idle processes may hold (0: no budget)."""
        self._idle_pss_mb = IDLE_PSS_PRIOR_MB
        self._procs: dict[int, JobProcessHandle] = {}
        self._idle: deque[JobProcessHandle] = deque()
        self._starting = 0
        self._init_failures = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._filler: asyncio.Task[None] | None = None
        self._pending_exits: dict[int, int] = {}
        self._inference_pid = 0
        self._last_launch = 0.0

    # -- JobExecutor ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Zygote first, then the inference process (if any runner is registered), then the
        warm pool."""
        await self._zygote.start()
        if self._zygote.inference_methods:
            await self._start_inference()
        self._filler = asyncio.get_running_loop().create_task(self._fill_task(), name="pool-fill")
        self._wake.set()

    async def launch(self, info: RunningJobInfo) -> HostedJob:
        """Hand the job to a busy process with room for it, else an idle one, else a fresh one;
        a process that fails its prewarm is replaced (up to LAUNCH_ATTEMPTS) so the job is not
        lost to it."""
        proc = self._busy_with_room() or self._take_idle()
        attempt = 1
        while proc is None:
            try:
                proc = await self._new_process(warm=False)
            except ProcessInitError:
                if attempt >= LAUNCH_ATTEMPTS:
                    raise
                attempt += 1
        job = proc.host(info)
        self._last_launch = asyncio.get_running_loop().time()
        self._wake.set()
        return job

    def set_warm_target(self, jobs: int) -> None:
        """Reconcile the warm pool toward `idle_target` (extra idle processes are stopped)."""
        self._warm_jobs = jobs
        target = self.idle_target
        while len(self._idle) > target:
            self._idle.pop().terminate("warm pool shrinking")
        if len(self._idle) + self._starting < target:
            self._wake.set()

    @property
    def idle_memory_mb(self) -> float:
        """PSS the idle processes hold, as last sampled."""
        return sum(p.memory_mb or 0.0 for p in self._idle)

    @property
    def idle_target(self) -> int:
        """The idle processes the pool keeps: enough for the worker's warm target of jobs, less
        the free places of processes already running jobs, within the memory budget at the
        measured idle PSS."""
        measured = [m for p in self._idle if (m := p.memory_mb) is not None]
        if measured:
            self._idle_pss_mb = max(measured)
        free = sum(p.free_slots for p in self._procs.values() if p.running)
        wanted = idle_processes_for(self._warm_jobs, free, self._jobs_per_process)
        return idle_within_budget(wanted, self._idle_pss_mb, self._idle_memory_mb)

    def process_pids(self) -> list[int]:
        return [self._zygote.pid, *self._procs] if self._zygote.pid else list(self._procs)

    def shared_pids(self) -> list[int]:
        return [self._inference_pid] if self._inference_pid else []

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        self._closing = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        running = [p for p in self._procs.values() if p.alive]
        for p in running:
            p.terminate("worker closing")
        if running:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait_exit()) for p in running],
                timeout=self._limits.shutdown_timeout + 2,
            )
        await self._zygote.aclose()
        for zygote in list(self._retired):
            await zygote.aclose()
        self._retired.clear()
        for p in list(self._procs.values()):
            p.exited(-9)
            await p.aclose()
        self._procs.clear()
        self._idle.clear()

    # -- pool -----------------------------------------------------------------------------------

    def _busy_with_room(self) -> JobProcessHandle | None:
        """The fullest process that runs jobs and may take one more (jobs_per_process > 1)."""
        if self._jobs_per_process == 1:
            return None
        hosts = [p for p in self._procs.values() if p.running and p.free_slots > 0]
        return max(hosts, key=lambda p: len(p.running), default=None)

    def _take_idle(self) -> JobProcessHandle | None:
        while self._idle:
            proc = self._idle.popleft()
            if proc.idle:
                return proc
        return None

    async def _new_process(self, warm: bool) -> JobProcessHandle:
        self._starting += 1
        try:
            pid, sock = await self._zygote.fork(warm=warm)
            if sock is None:
                raise ZygoteError("zygote sent no channel for a job process")
            proc = JobProcessHandle(pid, sock, self._limits, self._jobs_per_process)
            self._procs[pid] = proc
            if pid in self._pending_exits:
                proc.exited(self._pending_exits.pop(pid))
            log.info("initializing process", extra={"pid": pid})
            try:
                await proc.start()
            except ProcessInitError as e:
                self._init_failures += 1
                log.error(
                    "job process failed to initialize; it will be replaced",
                    extra={
                        "pid": pid,
                        "error": str(e),
                        "consecutive_failures": self._init_failures,
                    },
                )
                proc.kill(str(e))
                raise
            self._init_failures = 0
            return proc
        finally:
            self._starting -= 1

    async def _fill_task(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._after_launches()
            while (
                len(self._idle) + self._starting < self.idle_target
                and self._init_failures < MAX_CONSECUTIVE_INIT_FAILURES
                and not self._closing
            ):
                with contextlib.suppress(ProcessInitError):
                    self._idle.append(await self._new_process(warm=True))
            if self._init_failures >= MAX_CONSECUTIVE_INIT_FAILURES:
                log.error(
                    "prewarm keeps failing: the pool stops prefilling; jobs still get fresh "
                    "processes. Fix prewarm_fnc.",
                    extra={"failures": self._init_failures},
                )

    async def _after_launches(self) -> None:
        """Wait until no job has been launched for REFILL_QUIET_S (at most REFILL_MAX_DELAY_S):
        a fork started right away would take the CPU from the job process that is just
        starting its entrypoint."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFILL_MAX_DELAY_S
        while (wait := self._last_launch + REFILL_QUIET_S - loop.time()) > 0:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(wait)

    async def _start_inference(self) -> None:
        pid, _ = await self._zygote.fork(ipc.FORK_INFERENCE)
        self._inference_pid = pid
        address = socket_name(self._zygote.pid)
        deadline = asyncio.get_running_loop().time() + INFERENCE_START_TIMEOUT_S
        while not _can_connect(address):
            if asyncio.get_running_loop().time() > deadline or pid != self._inference_pid:
                raise ZygoteError(
                    "the inference process did not start within "
                    f"{INFERENCE_START_TIMEOUT_S:g}s (see its log above)"
                )
            await asyncio.sleep(INFERENCE_READY_POLL_S)
        log.info(
            "inference process started",
            extra={"pid": pid, "methods": list(self._zygote.inference_methods)},
        )

    async def reload(self) -> None:
        """Dev mode: re-import the agent in a new zygote and replace the idle processes.

        Running jobs finish on the old code; the old zygote closes after its last child. A new
        zygote that fails to import (a syntax error mid-edit) is logged and the old one kept.
        """
        fresh = ZygoteClient(self._zygote_config, self._on_exit)
        try:
            await fresh.start()
        except ZygoteError as e:
            log.error("reload failed, keeping the previous agent code", extra={"error": str(e)})
            await fresh.aclose()
            return
        old, self._zygote = self._zygote, fresh
        self._retired.add(old)
        old_inference, self._inference_pid = self._inference_pid, 0
        if fresh.inference_methods:
            await self._start_inference()
        if old_inference:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old_inference, signal.SIGTERM)
        stale = list(self._idle)
        self._idle.clear()
        for proc in stale:
            proc.terminate("agent code reloaded")
        log.info(
            "agent code reloaded", extra={"zygote_pid": fresh.pid, "replaced_idle": len(stale)}
        )
        self._wake.set()
        self._close_retired()

    def _close_retired(self) -> None:
        for zygote in [z for z in self._retired if not z.children]:
            self._retired.discard(zygote)
            asyncio.get_running_loop().create_task(zygote.aclose())

    def _on_exit(self, pid: int, code: int) -> None:
        if self._retired:
            self._close_retired()
        if pid == self._inference_pid:
            self._inference_pid = 0
            if not self._closing:
                log.error(
                    "inference process died, restarting it",
                    extra={"pid": pid, "exit": describe_exit(code)},
                )
                asyncio.get_running_loop().create_task(self._start_inference())
            return
        proc = self._procs.pop(pid, None)
        if proc is None:
            self._pending_exits[pid] = code
            return
        proc.exited(code)
        asyncio.get_running_loop().create_task(self._retire(proc))
        self._wake.set()

    @staticmethod
    async def _retire(proc: JobProcessHandle) -> None:
        """Release a process's resources once its jobs' outcomes are settled."""
        await proc.wait_finished()
        await proc.aclose()
