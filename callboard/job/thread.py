"""THREAD executor: each job in its own thread with its own event loop (for dev and tests).

Same contract as the process executor; a thread cannot be killed, so a job that ignores its
shutdown is reported failed after the shutdown timeout and abandoned.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from callboard.job.context import JobExecutorType, JobProcess, RunningJobInfo
from callboard.job.flavour import new_job_context, new_job_process
from callboard.job.inference import LocalInference, initialize_runners, registered_runners
from callboard.job.runner import Entrypoint, JobOutcome, RunnableJob, failed, run_job
from callboard.log import get_logger

log = get_logger("job.thread")


class ThreadJob:
    """One job running on a thread."""

    def __init__(
        self,
        info: RunningJobInfo,
        entrypoint: Entrypoint,
        prewarm: Callable[[JobProcess], Any],
        shutdown_timeout: float,
        inference: LocalInference | None,
    ) -> None:
        self._info = info
        self._inference = inference
        self._entrypoint = entrypoint
        self._prewarm = prewarm
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: RunnableJob | None = None
        self._lock = threading.Lock()
        self._pending_stop: str | None = None
        self._owner = asyncio.get_running_loop()
        self._done: asyncio.Future[JobOutcome] = self._owner.create_future()
        self._known: asyncio.Future[JobOutcome] = self._owner.create_future()
        self._thread = threading.Thread(target=self._main, name=f"job-{info.job.id}", daemon=True)

    @property
    def info(self) -> RunningJobInfo:
        return self._info

    @property
    def pid(self) -> int | None:
        return None

    @property
    def memory_mb(self) -> float | None:
        return None

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        try:
            outcome = asyncio.run(self._run())
        except BaseException as e:  # a crash of the job thread itself
            outcome = failed(f"job thread crashed: {e!r}")
        self._owner.call_soon_threadsafe(self._resolve, outcome)

    def _tell_outcome(self, outcome: JobOutcome) -> None:
        """From the job's thread: its outcome is known, its close begins."""
        self._owner.call_soon_threadsafe(self._outcome_known, outcome)

    def _outcome_known(self, outcome: JobOutcome) -> None:
        if not self._known.done():
            self._known.set_result(outcome)

    def _resolve(self, outcome: JobOutcome) -> None:
        self._outcome_known(outcome)
        if not self._done.done():
            self._done.set_result(outcome)

    async def _run(self) -> JobOutcome:
        self._loop = asyncio.get_running_loop()
        proc = new_job_process(JobExecutorType.THREAD)
        try:
            self._prewarm(proc)
        except Exception as e:
            log.exception("prewarm failed", extra={"job_id": self._info.job.id})
            return failed(f"prewarm raised {type(e).__name__}: {e}")
        ctx = new_job_context(proc, self._info, self._inference)
        with self._lock:
            self._ctx = ctx
            if self._pending_stop is not None:
                ctx.shutdown(self._pending_stop)
        return await run_job(
            ctx,
            self._entrypoint,
            self._shutdown_timeout,
            self._tell_outcome,
        )

    def terminate(self, reason: str) -> None:
        with self._lock:
            if self._ctx is None or self._loop is None:
                self._pending_stop = reason
            elif not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._ctx.shutdown, reason)
        self._owner.call_later(
            2 * self._shutdown_timeout,
            self._resolve,
            failed(f"job thread did not stop within {2 * self._shutdown_timeout:g}s"),
        )

    async def wait(self) -> JobOutcome:
        return await asyncio.shield(self._done)

    async def wait_outcome(self) -> JobOutcome:
        return await asyncio.shield(self._known)


class ThreadExecutor:
    """Runs each job on a fresh thread; nothing to prewarm ahead."""

    def __init__(
        self,
        entrypoint: Entrypoint,
        prewarm: Callable[[JobProcess], Any],
        shutdown_timeout: float,
    ) -> None:
        self._entrypoint = entrypoint
        self._prewarm = prewarm
        self._shutdown_timeout = shutdown_timeout
        self._jobs: set[ThreadJob] = set()
        self._inference: LocalInference | None = None

    async def start(self) -> None:
        """Initialize the registered inference runners (in this process), if any."""
        if registered_runners():
            runners = await asyncio.get_running_loop().run_in_executor(None, initialize_runners)
            self._inference = LocalInference(runners)

    async def launch(self, info: RunningJobInfo) -> ThreadJob:
        job = ThreadJob(
            info, self._entrypoint, self._prewarm, self._shutdown_timeout, self._inference
        )
        self._jobs.add(job)
        job.start()
        asyncio.get_running_loop().create_task(self._forget(job))
        return job

    async def _forget(self, job: ThreadJob) -> None:
        await job.wait()
        self._jobs.discard(job)

    def set_warm_target(self, jobs: int) -> None:
        return None

    def process_pids(self) -> list[int]:
        return []

    def shared_pids(self) -> list[int]:
        return []

    @property
    def idle_count(self) -> int:
        return 0

    async def aclose(self) -> None:
        for job in list(self._jobs):
            job.terminate("worker closing")
        for job in list(self._jobs):
            await job.wait()
