"""How many jobs the worker asks its executor to be able to start without a fork:
`num_idle_processes` at rest, more after a burst (the burst's jobs, for `idle_processes_window`
seconds), never more than the worker could still admit, none while draining. The executor turns
that into idle processes (fewer when a process takes several jobs) within its memory budget
(`callboard/job/pool.py`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

BURST_SPAN_S: Final = 1.0
"""Jobs admitted within this span count as one burst."""


def warm_target(base: int, burst: int, room: float, draining: bool) -> int:
    """Jobs the warm pool should be able to start without a fork: none while draining; else
    the larger of the configured pool and the recent burst, bounded by the `room` for more jobs
    (inf: no bound). The executor turns it into processes."""
    if draining:
        return 0
    want = max(base, burst)
    if math.isinf(room):
        return want
    return max(0, min(want, int(room)))


class Demand:
    """Times of recently admitted jobs, and the largest burst among them."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._admitted: deque[float] = deque()

    def admitted(self, now: float) -> None:
        self._admitted.append(now)
        self._forget(now)

    def burst(self, now: float) -> int:
        """The most jobs admitted within BURST_SPAN_S of each other in the last window."""
        self._forget(now)
        best = 0
        start = 0
        times = list(self._admitted)
        for end, t in enumerate(times):
            while t - times[start] > BURST_SPAN_S:
                start += 1
            best = max(best, end - start + 1)
        return best

    def _forget(self, now: float) -> None:
        while self._admitted and self._admitted[0] < now - self._window:
            self._admitted.popleft()
