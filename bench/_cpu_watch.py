"""CPU of the processes a benchmark runs on, second by second: which of them were busy while
something slow happened (e.g. callers that heard no greeting), without a profiler."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import psutil

PERIOD_S: Final = 1.0
SATURATED: Final = 0.9
"""A second in which the watched processes used this share of all cores saturated them."""

Groups = Callable[[], dict[str, list[psutil.Process]]]
"""The processes to watch now, by group name (a worker's tree changes while it runs)."""


@dataclass
class CpuWatch:
    """Samples CPU per group every PERIOD_S while running: percent of one core per second."""

    groups: Groups
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    per_process: dict[tuple[str, int], float] = field(default_factory=dict)
    """CPU seconds used during the watch by each (group, pid)."""
    names: dict[int, str] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for group, procs in self.groups().items():
            seen = out.setdefault(group, {})
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    t = p.cpu_times()
                    seen[p.pid] = float(t.user + t.system)
                    if p.pid not in self.names:
                        self.names[p.pid] = " ".join(p.cmdline()[-2:])[-60:]
        return out

    async def _run(self) -> None:
        first = self._read()
        self._last = {pid: s for g in first.values() for pid, s in g.items()}
        started = last = time.monotonic()
        while True:
            await asyncio.sleep(PERIOD_S)
            now = time.monotonic()
            sample: dict[str, float] = {}
            for group, seen in self._read().items():
                used = 0.0
                for pid, s in seen.items():
                    delta = s - self._last.get(pid, 0.0)  # a new process: all it used so far
                    self._last[pid] = s
                    used += delta
                    key = (group, pid)
                    self.per_process[key] = self.per_process.get(key, 0.0) + delta
                sample[group] = 100 * used / (now - last)
            self.samples.append((now - started, sample))
            last = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def timeline(self) -> str:
        """One line per second: each group's CPU in percent of one core."""
        groups = sorted({g for _, s in self.samples for g in s})
        lines = ["  t s  " + " ".join(f"{g:>10}" for g in groups) + "      total"]
        for at, s in self.samples:
            cells = " ".join(f"{s.get(g, 0.0):>9.0f}%" for g in groups)
            lines.append(f"{at:5.0f}  {cells} {sum(s.values()):>9.0f}%")
        return "\n".join(lines)

    def summary(self) -> str:
        """Each group's mean CPU over the watch, and how long the machine was saturated."""
        if not self.samples:
            return "  (no sample)"
        groups = sorted({g for _, s in self.samples for g in s})
        means = {g: sum(s.get(g, 0.0) for _, s in self.samples) / len(self.samples) for g in groups}
        cores = psutil.cpu_count() or 1
        full = sum(sum(s.values()) >= SATURATED * 100 * cores for _, s in self.samples)
        cells = ", ".join(f"{g} {m:.0f}%" for g, m in means.items())
        return (
            f"  mean over {self.samples[-1][0]:.0f} s, % of one core: {cells}; "
            f"total {sum(means.values()):.0f}% of {100 * cores}%, "
            f"at least {SATURATED:.0%} of all cores in {full} of {len(self.samples)} seconds"
        )

    def busiest(self, limit: int = 8) -> str:
        """The processes that used the most CPU during the watch."""
        span = self.samples[-1][0] if self.samples else 0.0
        top = sorted(self.per_process.items(), key=lambda kv: -kv[1])[:limit]
        return "\n".join(
            f"  {g:>8} pid {pid:>7}: {s:6.1f} CPU s ({100 * s / max(span, 1e-9):4.0f}%) "
            f"{self.names.get(pid, '')}"
            for (g, pid), s in top
        )
