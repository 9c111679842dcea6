"""What a job costs (CPU, memory), learned from the running jobs, and how many jobs fit.

Until a job has run past its warm-up, a worker cannot know what its jobs cost; it assumes
`WorkerOptions.initial_job_cost` (a conservative prior) and then follows the measured cost of
its running jobs with a moving average, so capacity tracks the agent actually deployed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

DEFAULT_JOB_CPU: Final = 0.25
"""Cores a job is assumed to use before any has been measured. A phone call with the offline
voice stack spends ~0.1 core in speech recognition (whisper tiny.en at real-time factor ~0.15
on 2 threads, the caller speaking ~40% of the time) and ~0.1 in media, VAD, TTS and the
agent's own Python; 0.25 rounds that up, so a first burst on 2 cores at load_threshold 0.7
takes 5 calls, not an unbounded number."""
DEFAULT_JOB_MEMORY_MB: Final = 100.0
"""MB (PSS) a job is assumed to hold before any has been measured: a job process with
livekit-agents, a room and an AgentSession, the models living in the shared inference process."""
COST_WARMUP_S: Final = 4.0
"""A job is measured only after this long: connecting and greeting cost more than a call's
steady state, and a job's own CPU rate needs a few samples."""
COST_TIME_CONSTANT_S: Final = 30.0
"""Time constant of the moving average of the measured cost (the first measure replaces the
prior outright)."""
CAPACITY_HYSTERESIS: Final = 0.1
"""A capacity estimate changes only when the raw value moves this far past an integer..."""
CAPACITY_RELATIVE_HYSTERESIS: Final = 0.02
"""...or this share of the estimate, whichever is more: a memory-bound capacity of hundreds of
jobs would otherwise change (and be logged) at every memory sample."""
SLOT_EPSILON: Final = 1e-9


@dataclass(frozen=True)
class JobCost:
    """One job's cost: `cpu` in cores (1.0 = one CPU busy), `memory_mb` in MB of PSS."""

    cpu: float = DEFAULT_JOB_CPU
    memory_mb: float = DEFAULT_JOB_MEMORY_MB


class CostModel:
    """The current estimate of a job's cost: the prior, then a moving average of measures."""

    def __init__(self, initial: JobCost) -> None:
        self.initial = initial
        self.cost = initial
        self.cpu_measured = False
        self.memory_measured = False

    def observe(self, cpu: float | None, memory_mb: float | None, dt: float) -> None:
        """Fold in one measure (the mean over the measured jobs) taken `dt` s after the last."""
        new_cpu, new_mem = self.cost.cpu, self.cost.memory_mb
        if cpu is not None:
            new_cpu = moving_average(new_cpu if self.cpu_measured else None, cpu, dt)
            self.cpu_measured = True
        if memory_mb is not None:
            new_mem = moving_average(new_mem if self.memory_measured else None, memory_mb, dt)
            self.memory_measured = True
        self.cost = JobCost(cpu=new_cpu, memory_mb=new_mem)


def moving_average(average: float | None, value: float, dt: float) -> float:
    """`average` moved towards `value`, seen `dt` s after the last value, with time constant
    COST_TIME_CONSTANT_S; the first value (`average` None) starts it."""
    if average is None:
        return value
    alpha = 1.0 - math.exp(-max(0.0, dt) / COST_TIME_CONSTANT_S)
    return average + alpha * (value - average)


def jobs_that_fit(budget: float, used: float, per_job: float) -> float:
    """How many more jobs of `per_job` fit in what `used` leaves of `budget` (inf: no limit)."""
    if math.isinf(budget):
        return math.inf
    if per_job <= 0:
        return math.inf if used < budget else 0.0
    return float(max(0, math.floor((budget - used) / per_job + SLOT_EPSILON)))


def settle(current: int | None, raw: float) -> int:
    """`floor(raw)`, except that `current` is kept while `raw` stays within the hysteresis of
    it, so a cost hovering at a boundary does not flap the estimate."""
    new = math.floor(raw + SLOT_EPSILON)
    if current is None or new == current:
        return new
    margin = max(CAPACITY_HYSTERESIS, CAPACITY_RELATIVE_HYSTERESIS * current)
    if new > current and raw < current + 1 + margin:
        return current
    if new < current and raw > current - margin:
        return current
    return new
