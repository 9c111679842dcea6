"""Load: a cgroup-aware CPU moving average sampled off the event loop, and the reservation that
keeps a burst of offers from over-accepting before the CPU average can see the new jobs.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psutil

from callboard.log import get_logger

log = get_logger("worker.load")

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
DEFAULT_JOB_LOAD: Final = 0.01
"""Load reserved for each just-accepted job while no running job has shown what a job costs.
Small on purpose: a first burst on an idle worker is bounded by max_jobs, not by a guess."""


class CpuSource:
    """CPU utilisation in [0, 1] of this machine or of our cgroup's CPU quota."""

    def __init__(self) -> None:
        self._quota = _cgroup_cpu_limit()
        self._last_usage: float | None = None
        self._last_time = 0.0

    @property
    def cpu_count(self) -> float:
        return self._quota or float(psutil.cpu_count() or 1)

    def sample(self, interval: float) -> float:
        """Utilisation over the next `interval` seconds (blocks: call it off the loop)."""
        if self._quota is None:
            return float(psutil.cpu_percent(interval=interval)) / 100.0
        start_usage, start = _cgroup_usage_s(), time.monotonic()
        time.sleep(interval)
        used = _cgroup_usage_s() - start_usage
        elapsed = time.monotonic() - start
        return max(0.0, min(1.0, used / (elapsed * self._quota))) if elapsed > 0 else 0.0


def _cgroup_cpu_limit() -> float | None:
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


class CpuLoadMonitor:
    """A daemon thread keeping the moving average of `samples` CPU samples of `interval` s."""

    def __init__(self, interval: float, samples: int, source: CpuSource | None = None) -> None:
        self._interval = interval
        self._samples: deque[float] = deque(maxlen=samples)
        self._source = source or CpuSource()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpu-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._source.sample(self._interval)
            with self._lock:
                self._samples.append(value)

    def value(self) -> float:
        with self._lock:
            return sum(self._samples) / len(self._samples) if self._samples else 0.0

    def stop(self) -> None:
        self._stop.set()


def effective_load(measured: float, running: int, reserved: int) -> float:
    """Measured load plus a reservation for `reserved` jobs not yet visible in `measured`.

    Each reserved job counts as the average load of a running job when that is known, else
    DEFAULT_JOB_LOAD, so a burst fills the worker in proportion instead of all at once.
    """
    per_job = measured / running if running > 0 and measured > 0 else DEFAULT_JOB_LOAD
    return min(1.0, max(0.0, measured) + reserved * max(per_job, DEFAULT_JOB_LOAD))


class LoadTracker:
    """The worker's load: a measured value (the CPU monitor, or a custom load_fnc called on a
    thread) plus reservations for jobs the measure cannot see yet (just started)."""

    def __init__(
        self,
        load_fnc: Callable[..., float] | None,
        owner: object,
        interval: float,
        samples: int,
    ) -> None:
        self._load_fnc = load_fnc
        self._owner = owner
        self._window = interval * samples
        self._cpu = CpuLoadMonitor(interval, samples) if load_fnc is None else None
        self._takes_owner = load_fnc is not None and _takes_an_argument(load_fnc)
        self._recent: dict[str, float] = {}
        self._failing = False
        self.measured = 0.0

    def start(self) -> None:
        if self._cpu is not None:
            self._cpu.start()

    def stop(self) -> None:
        if self._cpu is not None:
            self._cpu.stop()

    async def sample(self) -> None:
        """Take one measurement (off the loop); a failing load_fnc keeps the last value and is
        logged once when it starts failing and once when it recovers."""
        try:
            if self._cpu is not None or self._load_fnc is None:
                value = self._cpu.value() if self._cpu is not None else 0.0
            elif self._takes_owner:
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

    def job_started(self, job_id: str) -> None:
        self._recent[job_id] = time.monotonic()

    def job_ended(self, job_id: str) -> None:
        self._recent.pop(job_id, None)

    def effective(self, offers: int, jobs: int) -> float:
        """Measured load plus reservations for pending offers and recently started jobs."""
        horizon = time.monotonic() - self._window
        for job_id, started in list(self._recent.items()):
            if started < horizon:
                del self._recent[job_id]
        recent = len(self._recent)
        return effective_load(self.measured, max(0, jobs - recent), offers + recent)


def _takes_an_argument(fn: Callable[..., float]) -> bool:
    """Whether a load_fnc wants the worker (livekit-agents' signature) or nothing."""
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return False
