"""Load: CPU sampled off the event loop (the machine, the cgroup, or this worker's own process
tree against a CPU budget), each job process's own CPU, and the reservations that keep a burst
of offers from over-accepting before the measure can see the new jobs.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import psutil

from callboard.job.executor import RunningJob
from callboard.log import get_logger
from callboard.worker.cost import COST_WARMUP_S, CostModel, JobCost, jobs_that_fit, settle

log = get_logger("worker.load")

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
DEFAULT_JOB_LOAD: Final = 0.01
"""With a custom load_fnc (whose units are its own), the load reserved for each just-started
job while no running job has shown what a job costs."""
MEMORY_BUDGET_FRACTION: Final = 0.8
"""Without memory_budget_mb, jobs may take this share of the memory available at start."""
MB: Final = 1024 * 1024


# -- CPU sources ------------------------------------------------------------------------------


class CpuSource(Protocol):
    def used_s(self) -> float:
        """CPU seconds used since the previous call (0 on the first)."""
        ...


class MachineCpu:
    """Busy CPU seconds of the whole machine."""

    def __init__(self) -> None:
        self._last: float | None = None

    def used_s(self) -> float:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        last, self._last = self._last, busy
        return 0.0 if last is None else max(0.0, busy - last)


class CgroupCpu:
    """CPU seconds of our cgroup (what its quota limits)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def used_s(self) -> float:
        now = _cgroup_usage_s()
        last, self._last = self._last, now
        return 0.0 if last is None else max(0.0, now - last)


class PidCpu:
    """CPU seconds of given processes, each counted from when it was first seen (or from its
    birth, when it was born since the previous call)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[int, float] = {}
        self._last_time = time.time()

    def used_s(self, pids: Iterable[int]) -> dict[int, float]:
        now = time.time()
        out: dict[int, float] = {}
        seen: dict[int, float] = {}
        for pid in pids:
            try:
                proc = self._procs.get(pid) or psutil.Process(pid)
                t = proc.cpu_times()
                cpu = t.user + t.system
                born = proc.create_time()
            except (psutil.Error, OSError):
                continue
            self._procs[pid] = proc
            seen[pid] = cpu
            if pid in self._last:
                out[pid] = max(0.0, cpu - self._last[pid])
            elif born >= self._last_time:
                out[pid] = cpu
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        self._last = seen
        self._last_time = now
        return out


class TreeCpu:
    """CPU seconds of this process and all its descendants (the worker's own budget)."""

    def __init__(self, pids: PidCpu) -> None:
        self._pids = pids
        self.last: dict[int, float] = {}

    def used_s(self) -> float:
        me = psutil.Process(os.getpid())
        try:
            tree = [os.getpid(), *(p.pid for p in me.children(recursive=True))]
        except (psutil.Error, OSError):
            tree = [os.getpid()]
        self.last = self._pids.used_s(tree)
        return sum(self.last.values())


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 quota, or None when unlimited or not in a cgroup."""
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return float(quota) / float(period)


def _cgroup_usage_s() -> float:
    for line in (CGROUP_ROOT / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    return 0.0


def default_memory_budget_mb() -> float:
    """MEMORY_BUDGET_FRACTION of the memory available now (of the cgroup's limit, if any)."""
    available = float(psutil.virtual_memory().available)
    try:
        limit = (CGROUP_ROOT / "memory.max").read_text().strip()
        if limit != "max":
            current = float((CGROUP_ROOT / "memory.current").read_text())
            available = min(available, float(limit) - current)
    except (OSError, ValueError):
        pass
    return MEMORY_BUDGET_FRACTION * max(0.0, available) / MB


# -- sampling thread --------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """Cores used over the sampling window: in total, and by each tracked process."""

    total: float = 0.0
    pids: dict[int, float] = field(default_factory=dict)
    """Each tracked process's rate while it was seen (a job's own cost)."""
    jobs: float = 0.0
    """The part of `total` that the tracked processes other than `shared` used (ended ones
    included), so that what is left is everything but the jobs."""


@dataclass(frozen=True)
class _Tick:
    seconds: float
    total_s: float
    pids_s: dict[int, float]


class CpuLoadMonitor:
    """A daemon thread keeping `samples` CPU samples of `interval` s: the source's total and
    each tracked process's own CPU (the job processes, the shared inference process)."""

    def __init__(
        self,
        interval: float,
        samples: int,
        source: CpuSource | None = None,
        tree: bool = False,
    ) -> None:
        self._interval = interval
        self._ticks: deque[_Tick] = deque(maxlen=samples)
        self._pids = PidCpu()
        self._tree = TreeCpu(self._pids) if tree else None
        self._source: CpuSource = self._tree or source or _default_source()
        self.tracked: frozenset[int] = frozenset()
        """Processes whose own CPU is wanted (set from the event loop)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpu-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        self._sample()
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            total, pids = self._sample()
            with self._lock:
                self._ticks.append(_Tick(now - last, total, pids))
            last = now

    def _sample(self) -> tuple[float, dict[int, float]]:
        total = self._source.used_s()
        if self._tree is not None:
            return total, {p: s for p, s in self._tree.last.items() if p in self.tracked}
        return total, self._pids.used_s(self.tracked)

    def snapshot(self, shared: frozenset[int] = frozenset()) -> CpuSnapshot:
        with self._lock:
            ticks = list(self._ticks)
        seconds = sum(t.seconds for t in ticks)
        if seconds <= 0:
            return CpuSnapshot()
        pids: dict[int, list[float]] = {}
        for t in ticks:
            for pid, used in t.pids_s.items():
                acc = pids.setdefault(pid, [0.0, 0.0])
                acc[0] += used
                acc[1] += t.seconds
        return CpuSnapshot(
            total=sum(t.total_s for t in ticks) / seconds,
            pids={pid: used / secs for pid, (used, secs) in pids.items() if secs > 0},
            jobs=sum(used for pid, (used, _) in pids.items() if pid not in shared) / seconds,
        )

    def value(self) -> float:
        """Cores used over the window, in total."""
        return self.snapshot().total

    def stop(self) -> None:
        self._stop.set()


def _default_source() -> CpuSource:
    return CgroupCpu() if cgroup_cpu_limit() is not None else MachineCpu()


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
    ) -> None:
        self._load_fnc = load_fnc
        self._owner = owner
        self._window = interval * samples
        self.budgets = budgets
        self._cpu = CpuLoadMonitor(interval, samples, tree=own_tree) if load_fnc is None else None
        self._takes_owner = load_fnc is not None and _takes_an_argument(load_fnc)
        self._jobs: dict[str, _Job] = {}
        self._shared: frozenset[int] = frozenset()
        self._snapshot = CpuSnapshot()
        self._failing = False
        self._last_learn = time.monotonic()
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
        rates = self._snapshot.pids
        running = [j for j in self._jobs.values() if j.pid in rates]
        grown = [j for j in running if now - j.started >= COST_WARMUP_S]
        cpu = None
        if grown:
            shared = sum(rates.get(p, 0.0) for p in self._shared)
            own = sum(rates[j.pid] for j in grown if j.pid is not None) / len(grown)
            cpu = own + shared / len(running)
        mems = [
            m
            for j in self._jobs.values()
            if now - j.started >= COST_WARMUP_S and (m := j.handle.memory_mb) is not None
        ]
        self.model.observe(cpu, sum(mems) / len(mems) if mems else None, dt)

    # -- what the server sees, and admission -----------------------------------------------------

    def effective(self, offers: int) -> float:
        """The load with reservations for `offers` pending offers and the jobs not yet measured."""
        if self._cpu is None:
            return self._custom_effective(offers)
        return min(1.0, self._cores(offers) / self.budgets.cpus)

    def _cores(self, offers: int) -> float:
        """Cores in use or spoken for: everything but our jobs as measured, each job at its own
        rate (at least the learned cost while it warms up), the learned cost per offer."""
        now = time.monotonic()
        rates = self._snapshot.pids
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

    def background(self) -> float:
        """Cores used by neither the jobs nor the processes shared among them (the worker
        itself, the zygote, idle processes, and whatever else the measure sees)."""
        snap = self._snapshot
        shared = sum(snap.pids.get(p, 0.0) for p in self._shared)
        return max(0.0, snap.total - snap.jobs - shared)

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
