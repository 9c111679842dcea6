"""What this machine (or cgroup, or this worker's own process tree) offers and uses: CPU
seconds sampled off the event loop, each tracked process's own CPU and how long it waited for
one, and the memory available.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import psutil

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
MEMORY_BUDGET_FRACTION: Final = 0.8
"""Without memory_budget_mb, jobs may take this share of the memory available at start."""
MB: Final = 1024 * 1024
SATURATED_RUNNABLE: Final = 0.9
"""Share of a window a process must be runnable for its run-queue wait to count as unmet
demand (below it, the process slept part of the window: it was keeping up)."""


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
    birth, when it was born since the previous call); `waited` holds, for the same span, the
    seconds each one's main thread was runnable but waiting for a CPU (Linux schedstat)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[int, tuple[float, float]] = {}
        self._last_time = time.time()
        self.waited: dict[int, float] = {}

    def used_s(self, pids: Iterable[int]) -> dict[int, float]:
        now = time.time()
        out: dict[int, float] = {}
        waited: dict[int, float] = {}
        seen: dict[int, tuple[float, float]] = {}
        for pid in pids:
            try:
                proc = self._procs.get(pid) or psutil.Process(pid)
                t = proc.cpu_times()
                cpu = t.user + t.system
                born = proc.create_time()
            except (psutil.Error, OSError):
                continue
            wait = run_queue_wait_s(pid)
            self._procs[pid] = proc
            seen[pid] = (cpu, wait)
            if pid in self._last:
                last_cpu, last_wait = self._last[pid]
                out[pid] = max(0.0, cpu - last_cpu)
                waited[pid] = max(0.0, wait - last_wait)
            elif born >= self._last_time:
                out[pid], waited[pid] = cpu, wait
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        self._last = seen
        self._last_time = now
        self.waited = waited
        return out


def run_queue_wait_s(pid: int) -> float:
    """Seconds the process's main thread has spent runnable, waiting for a CPU (0 where the
    kernel does not say): what its CPU time leaves out of its demand on a busy machine."""
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


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
    demand: dict[int, float] = field(default_factory=dict)
    """What each tracked process would have used on an idle machine (`demand_rate`): its CPU
    rate, or, when it was runnable nearly all the time, that plus the rate at which it waited
    for a CPU."""
    jobs: float = 0.0
    """The part of `total` that the tracked processes other than `shared` used (ended ones
    included), so that what is left is everything but the jobs."""


@dataclass(frozen=True)
class _Tick:
    seconds: float
    total_s: float
    pids_s: dict[int, float]
    waits_s: dict[int, float]


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
            waits = {pid: w for pid, w in self._pids.waited.items() if pid in pids}
            with self._lock:
                self._ticks.append(_Tick(now - last, total, pids, waits))
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
                acc = pids.setdefault(pid, [0.0, 0.0, 0.0])
                acc[0] += used
                acc[1] += t.seconds
                acc[2] += t.waits_s.get(pid, 0.0)
        return CpuSnapshot(
            total=sum(t.total_s for t in ticks) / seconds,
            pids={pid: used / secs for pid, (used, secs, _) in pids.items() if secs > 0},
            demand={
                pid: demand_rate(used, wait, secs)
                for pid, (used, secs, wait) in pids.items()
                if secs > 0
            },
            jobs=sum(used for pid, (used, _, _) in pids.items() if pid not in shared) / seconds,
        )

    def value(self) -> float:
        """Cores used over the window, in total."""
        return self.snapshot().total

    def stop(self) -> None:
        self._stop.set()


def demand_rate(used_s: float, waited_s: float, seconds: float) -> float:
    """A process's CPU demand over `seconds`. One that was runnable (running or waiting for a
    CPU) less than SATURATED_RUNNABLE of the time kept up with its work, however long it
    waited: it needed what it used. One runnable nearly all the time was starved: its usage
    understates its need, usage plus wait bounds it."""
    runnable = (used_s + waited_s) / seconds
    return runnable if runnable >= SATURATED_RUNNABLE else used_s / seconds


def _default_source() -> CpuSource:
    return CgroupCpu() if cgroup_cpu_limit() is not None else MachineCpu()
