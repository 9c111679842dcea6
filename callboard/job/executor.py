"""The contract between the worker and whatever runs its jobs (threads, processes, a zygote).

The worker only launches, asks to terminate, and awaits the one outcome; how a job is isolated,
supervised and killed belongs to the executor.
"""

from __future__ import annotations

from typing import Protocol

from callboard.job.context import RunningJobInfo
from callboard.job.runner import JobOutcome


class RunningJob(Protocol):
    """A launched job."""

    @property
    def info(self) -> RunningJobInfo: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def memory_mb(self) -> float | None:
        """The job's memory (PSS, MB) at its last sample; None when not measured."""
        ...

    def terminate(self, reason: str) -> None:
        """Ask the job to shut down; the executor escalates if it does not in time."""

    async def wait(self) -> JobOutcome:
        """The job's one terminal outcome."""
        ...

    async def wait_outcome(self) -> JobOutcome:
        """The outcome as soon as it is known: before the job leaves its room and runs its
        shutdown callbacks where the executor hears it then, else when `wait` has it."""
        ...


class JobExecutor(Protocol):
    """Starts jobs and owns their lifetime."""

    async def start(self) -> None:
        """Warm up (prewarmed idle processes, zygote, ...)."""

    async def launch(self, info: RunningJobInfo) -> RunningJob:
        """Start `info`'s job; returns once it is running."""
        ...

    def set_warm_target(self, jobs: int) -> None:
        """Keep prewarmed processes enough for the next `jobs` jobs to start without a fork (the
        worker lowers it while draining or at its cap)."""

    def process_pids(self) -> list[int]:
        """Pids of the processes this executor runs (idle and busy), for metrics."""
        ...

    def shared_pids(self) -> list[int]:
        """Pids of processes that serve every job (the inference process), whose CPU is part
        of what each job costs."""
        ...

    @property
    def idle_count(self) -> int: ...

    async def aclose(self) -> None:
        """Stop every job (forcefully if needed) and release every resource."""
