"""Load: a cgroup-aware CPU moving average sampled off the event loop, and the reservation that
keeps a burst of offers from over-accepting before the CPU average can see the new jobs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Final

import psutil

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
