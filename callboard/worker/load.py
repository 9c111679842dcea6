"""Load and admission: the measured CPU (`machine.py`) and each job process's own, plus the
reservations that keep a burst of offers from over-accepting before the measure can see the
new jobs.

The load reported to the server is what the measure shows for everything but the jobs, plus
each job at its own measured rate, plus the learned cost of a job (`cost.CostModel`) for each
pending offer and each job still warming up. An offer is admitted only if one more such job
stays within `load_threshold` and the memory budget.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from callboard.job.executor import RunningJob
from callboard.log import get_logger
from callboard.worker.cost import (
    COST_WARMUP_S,
    CostModel,
    JobCost,
    jobs_that_fit,
    moving_average,
    settle,
)
from callboard.worker.machine import (
    CpuLoadMonitor,
    CpuSnapshot,
    cgroup_cpu_limit,
    default_memory_budget_mb,
)
from callboard.worker.options import ResolvedOptions

log = get_logger("worker.load")

DEFAULT_JOB_LOAD: Final = 0.01
"""With a custom load_fnc (whose units are its own), the load reserved for each just-started
job while no running job has shown what a job costs."""


# -- the worker's load --------------------------------------------------------------------------


@dataclass
class _Job:
    handle: RunningJob
    started: float
    """time.monotonic() when the job started."""

    @property
    def pid(self) -> int | None:
        pid = self.handle.pid
        return pid if pid and pid != os.getpid() else None


@dataclass(frozen=True)
class Budgets:
    """What the worker measures load against."""

    cpus: float
    """Cores the load is a share of."""
    threshold: float
    """Load at which no further job is admitted (inf: no CPU limit)."""
    memory_mb: float
    """Total PSS the jobs may hold."""
    max_jobs: int = 0
    """A hard cap on jobs, 0 for none."""


def budgets_for(r: ResolvedOptions) -> Budgets:
    """The CPU and memory a worker admits jobs against, from its options and this machine."""
    o = r.opts
    return Budgets(
        cpus=o.cpu_budget or cgroup_cpu_limit() or float(os.cpu_count() or 1),
        threshold=r.load_threshold,
        memory_mb=o.memory_budget_mb or default_memory_budget_mb(),
        max_jobs=o.max_jobs,
    )


class LoadTracker:
    """The worker's load and admission: a measured value (the CPU monitor, or a custom load_fnc
    called on a thread) plus reservations for what the measure cannot see yet."""

    def __init__(
        self,
        load_fnc: Callable[..., float] | None,
        owner: object,
        interval: float,
        samples: int,
        budgets: Budgets,
        initial_cost: JobCost,
        own_tree: bool = False,
        monitor: CpuLoadMonitor | None = None,
    ) -> None:
        self._load_fnc = load_fnc
        self._owner = owner
        self._window = interval * samples
        self.budgets = budgets
        if load_fnc is not None:
            self._cpu: CpuLoadMonitor | None = None
        else:
            self._cpu = monitor or CpuLoadMonitor(interval, samples, tree=own_tree)
        self._takes_owner = load_fnc is not None and _takes_an_argument(load_fnc)
        self._jobs: dict[str, _Job] = {}
        self._shared: frozenset[int] = frozenset()
        self._snapshot = CpuSnapshot()
        self._failing = False
        self._last_learn = time.monotonic()
        self._background: float | None = None
        self._idle_background: float | None = None
        self._last_job_at = -math.inf
        self.model = CostModel(initial_cost)
        self.measured = 0.0
        """The measured load (share of budgets.cpus), without reservations."""
        self.capacity: int | None = None
        """How many jobs fit on this worker at the current cost (None: no limit)."""
        self._estimate_capacity()

    def start(self) -> None:
        if self._cpu is not None:
            self._cpu.start()

    def stop(self) -> None:
        if self._cpu is not None:
            self._cpu.stop()

    @property
    def cost(self) -> JobCost:
        return self.model.cost

    def set_shared_pids(self, pids: Iterable[int]) -> None:
        """Processes serving every job (the inference process): their CPU is shared out among
        the running jobs' cost."""
        self._shared = frozenset(pids)
        self._track()

    def job_started(self, job_id: str, handle: RunningJob) -> None:
        self._jobs[job_id] = _Job(handle, time.monotonic())
        self._track()

    def job_ended(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._last_job_at = time.monotonic()
        self._track()

    def _track(self) -> None:
        if self._cpu is not None:
            pids = {j.pid for j in self._jobs.values() if j.pid is not None}
            self._cpu.tracked = frozenset(pids | self._shared)

    async def sample(self) -> bool:
        """Take one measurement (off the loop) and learn from it; True when the capacity
        estimate changed. A failing load_fnc keeps the last value and is logged once when it
        starts failing and once when it recovers."""
        if self._cpu is not None:
            self._snapshot = self._cpu.snapshot(self._shared)
            self.measured = min(1.0, self._snapshot.total / self.budgets.cpus)
        else:
            await self._sample_load_fnc()
        self._learn()
        return self._estimate_capacity()

    async def _sample_load_fnc(self) -> None:
        assert self._load_fnc is not None
        try:
            if self._takes_owner:
                value = await asyncio.to_thread(self._load_fnc, self._owner)
            else:
                value = await asyncio.to_thread(self._load_fnc)
            self.measured = max(0.0, min(1.0, float(value)))
            if self._failing:
                self._failing = False
                log.info("load_fnc works again", extra={"load": self.measured})
        except Exception:
            if not self._failing:
                self._failing = True
                log.exception("load_fnc failed; keeping the previous load until it works again")

    def _learn(self) -> None:
        now = time.monotonic()
        dt, self._last_learn = now - self._last_learn, now
        outside = self._observe_background(dt, now)
        rates = self._own_rates()  # demand: usage alone would teach a starved job is cheap
        running = [j for j in self._jobs.values() if j.pid in rates]
        grown = [j for j in running if now - j.started >= COST_WARMUP_S]
        cpu = None
        if grown:
            shared = sum(self._snapshot.demand.get(p, 0.0) for p in self._shared)
            own = sum(rates[j.pid] for j in grown if j.pid is not None) / len(grown)
            cpu = own + shared / len(running) + self._caused_outside(outside, len(running))
        mems = [
            m
            for j in self._jobs.values()
            if now - j.started >= COST_WARMUP_S and (m := j.handle.memory_mb) is not None
        ]
        self.model.observe(cpu, sum(mems) / len(mems) if mems else None, dt)

    def _own_rates(self) -> dict[int, float]:
        """Each job process's demand shared out among the jobs it runs (cores per job)."""
        demand = self._snapshot.demand
        per_pid = Counter(j.pid for j in self._jobs.values() if j.pid in demand)
        return {pid: demand[pid] / n for pid, n in per_pid.items() if pid is not None}

    # -- what the server sees, and admission -----------------------------------------------------

    def effective(self, offers: int) -> float:
        """The load with reservations for `offers` pending offers and the jobs not yet measured."""
        if self._cpu is None:
            return self._custom_effective(offers)
        return min(1.0, self._cores(offers) / self.budgets.cpus)

    def _cores(self, offers: int) -> float:
        """Cores in use or spoken for: everything but our jobs as measured, each job at its own
        demand (at least the learned cost while it warms up), the learned cost per offer."""
        now = time.monotonic()
        rates = self._own_rates()
        per_job = self.cost.cpu
        jobs = 0.0
        for j in self._jobs.values():
            age = now - j.started
            own = rates.get(j.pid) if j.pid is not None else None
            if own is None:  # inside the measured total once the window has seen it
                jobs += per_job if age < COST_WARMUP_S + self._window else 0.0
            else:
                jobs += max(own, per_job) if age < COST_WARMUP_S else own
        # the shared processes' CPU stays in `other`: the learned cost carries each job's share
        other = max(0.0, self._snapshot.total - self._snapshot.jobs)
        return other + jobs + offers * per_job

    def _custom_effective(self, offers: int) -> float:
        horizon = time.monotonic() - self._window
        recent = sum(1 for j in self._jobs.values() if j.started >= horizon)
        return custom_effective_load(self.measured, len(self._jobs) - recent, offers + recent)

    def memory_mb(self, offers: int) -> float:
        """PSS held or spoken for by the jobs: each measured job as measured, the learned cost
        for each job not yet measured and each pending offer."""
        now = time.monotonic()
        per_job = self.cost.memory_mb
        held = 0.0
        for j in self._jobs.values():
            m = j.handle.memory_mb
            young = now - j.started < COST_WARMUP_S
            held += per_job if m is None else max(m, per_job) if young else m
        return held + offers * per_job

    def free_slots(self, offers: int) -> float:
        """How many more jobs may be admitted now (inf: no limit)."""
        b = self.budgets
        cost = self.cost
        slots = jobs_that_fit(b.memory_mb, self.memory_mb(offers), cost.memory_mb)
        if self._cpu is not None:
            cpu_budget = b.threshold * b.cpus
            slots = min(slots, jobs_that_fit(cpu_budget, self._cores(offers), cost.cpu))
        elif not math.isinf(b.threshold) and self.effective(offers) >= b.threshold:
            slots = 0.0
        if b.max_jobs:
            slots = min(slots, float(max(0, b.max_jobs - len(self._jobs) - offers)))
        return slots

    def problem(self, offers: int) -> str | None:
        """Why one more job must be refused now, or None."""
        b = self.budgets
        if b.max_jobs and len(self._jobs) + offers >= b.max_jobs:
            return f"at the job cap (max_jobs={b.max_jobs})"
        cost = self.cost
        memory = self.memory_mb(offers)
        if jobs_that_fit(b.memory_mb, memory, cost.memory_mb) < 1:
            return (
                f"memory {memory:.0f} MB + {cost.memory_mb:.0f} MB a job > memory budget "
                f"{b.memory_mb:.0f} MB"
            )
        if math.isinf(b.threshold):
            return None
        load = self.effective(offers)
        if self._cpu is None:
            over = load >= b.threshold
            return f"load {load:.2f} >= load_threshold {b.threshold:g}" if over else None
        if jobs_that_fit(b.threshold * b.cpus, self._cores(offers), cost.cpu) < 1:
            step = cost.cpu / b.cpus
            return f"load {load:.2f} + {step:.2f} a job > load_threshold {b.threshold:g}"
        return None

    def log_capacity(self, fields: dict[str, Any]) -> None:
        """One line at start and when the capacity estimate changes (as a job's cost is
        learned)."""
        cost, b = self.cost, self.budgets
        log.info(
            "capacity",
            extra={
                **fields,
                "capacity": self.capacity,
                "job_cpu": round(cost.cpu, 3),
                "job_memory_mb": round(cost.memory_mb, 1),
                "measured": self.model.cpu_measured,
                "cpu_budget": b.cpus,
                "load_threshold": b.threshold,
                "memory_budget_mb": round(b.memory_mb),
            },
        )

    def background(self) -> float:
        """Cores used by neither the jobs nor what they cause: what the measure sees outside
        the job processes and the shared ones while no job runs (the worker itself, the zygote,
        idle processes, other work), averaged over COST_TIME_CONSTANT_S so that the capacity
        estimate does not follow its noise. Until the worker has been idle, everything outside
        the jobs."""
        if self._idle_background is not None:
            return self._idle_background
        return self._background or 0.0

    def _observe_background(self, dt: float, now: float) -> float | None:
        """Fold this sample's CPU outside the jobs into the averages; returns it (None before
        the first sample). It counts as idle when no job ran within the sampling window."""
        snap = self._snapshot
        if snap.total <= 0:  # no sample yet
            return None
        shared = sum(snap.pids.get(p, 0.0) for p in self._shared)
        outside = max(0.0, snap.total - snap.jobs - shared)
        self._background = moving_average(self._background, outside, dt)
        if not self._jobs and now - self._last_job_at > self._window:
            self._idle_background = moving_average(self._idle_background, outside, dt)
        return outside

    def _caused_outside(self, outside: float | None, jobs: int) -> float:
        """Each running job's share of the CPU outside the job processes above the idle
        background: what calls cost beyond their own process (the worker relaying them; on one
        machine, the server carrying their media and the callers)."""
        if outside is None or self._idle_background is None or jobs <= 0:
            return 0.0
        return max(0.0, outside - self._idle_background) / jobs

    def _estimate_capacity(self) -> bool:
        """Jobs that fit on this worker beside its measured background; True if changed."""
        b, cost = self.budgets, self.cost
        raw = math.inf if b.memory_mb == math.inf else b.memory_mb / cost.memory_mb
        if self._cpu is not None and not math.isinf(b.threshold):
            raw = min(raw, max(0.0, b.threshold * b.cpus - self.background()) / cost.cpu)
        if b.max_jobs:
            raw = min(raw, float(b.max_jobs))
        new = None if math.isinf(raw) else settle(self.capacity, raw)
        changed, self.capacity = new != self.capacity, new
        return changed


def custom_effective_load(measured: float, running: int, reserved: int) -> float:
    """A custom load_fnc's value plus a reservation for `reserved` jobs not yet visible in it:
    each counts as the average load of a running job when that is known, else DEFAULT_JOB_LOAD.
    """
    per_job = measured / running if running > 0 and measured > 0 else DEFAULT_JOB_LOAD
    return min(1.0, max(0.0, measured) + reserved * max(per_job, DEFAULT_JOB_LOAD))


def _takes_an_argument(fn: Callable[..., float]) -> bool:
    """Whether a load_fnc wants the worker (livekit-agents' signature) or nothing."""
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return False
