"""What a job costs: the prior until a measure, then a moving average; how many jobs fit; a
capacity estimate that does not flap at a boundary; and the CPU monitor measuring a real
process's own share of a core, off the event loop.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil
import pytest

from callboard.worker import load as load_module
from callboard.worker.cost import (
    COST_TIME_CONSTANT_S,
    CostModel,
    JobCost,
    jobs_that_fit,
    settle,
)
from callboard.worker.load import Budgets, LoadTracker
from callboard.worker.machine import CpuLoadMonitor, CpuSnapshot

BURNER: Final = (
    "import asyncio; from tests.worker.agents.jobs import burn; asyncio.run(burn({duty}))"
)
"""A process keeping `duty` of a core busy, as the burning test jobs do."""
REPO: Final = Path(__file__).resolve().parents[2]


def test_the_prior_holds_until_a_job_is_measured_then_the_measure_replaces_it() -> None:
    model = CostModel(JobCost(cpu=0.25, memory_mb=100.0))
    model.observe(None, None, 1.0)
    assert model.cost == JobCost(0.25, 100.0) and not model.cpu_measured
    model.observe(0.1, None, 1.0)
    assert model.cost == JobCost(0.1, 100.0) and model.cpu_measured
    model.observe(None, 40.0, 1.0)
    assert model.cost == JobCost(0.1, 40.0) and model.memory_measured


def test_later_measures_move_the_cost_with_the_time_constant() -> None:
    model = CostModel(JobCost())
    model.observe(0.1, 50.0, 0.0)
    model.observe(0.3, 150.0, COST_TIME_CONSTANT_S)
    share = 1 - math.exp(-1)
    assert model.cost.cpu == pytest.approx(0.1 + share * 0.2)
    assert model.cost.memory_mb == pytest.approx(50.0 + share * 100.0)


def test_jobs_that_fit() -> None:
    assert jobs_that_fit(0.7, 0.0, 0.15) == 4
    assert jobs_that_fit(0.7, 0.1, 0.15) == 4
    assert jobs_that_fit(0.7, 0.6, 0.15) == 0
    assert jobs_that_fit(0.6, 0.0, 0.15) == 4, "exactly at the budget fits"
    assert jobs_that_fit(0.7, 0.9, 0.15) == 0
    assert jobs_that_fit(math.inf, 5.0, 0.15) == math.inf


def test_the_capacity_estimate_changes_only_past_a_margin() -> None:
    assert settle(None, 4.67) == 4
    assert settle(4, 4.99) == 4
    assert settle(4, 5.02) == 4, "just over a boundary: kept"
    assert settle(4, 5.2) == 5
    assert settle(5, 4.97) == 5, "just under: kept"
    assert settle(5, 4.8) == 4
    assert settle(300, 306.0) == 300, "large capacities move by 2% at least"
    assert settle(300, 308.5) == 308
    assert settle(300, 295.0) == 300
    assert settle(300, 293.5) == 293


def test_the_cpu_monitor_measures_a_process_own_share_of_a_core() -> None:
    """Compared with the process's own CPU times over the same span (the machine may be too
    busy for the burner to get its 0.3 core)."""
    burner = psutil.Popen([sys.executable, "-c", BURNER.format(duty=0.3)], cwd=REPO)
    monitor = CpuLoadMonitor(0.25, 100, tree=True)
    try:
        time.sleep(0.3)
        monitor.tracked = frozenset({burner.pid})
        before, start = cpu_s(burner), time.monotonic()
        monitor.start()
        time.sleep(2.0)
        snap = monitor.snapshot()
        used = (cpu_s(burner) - before) / (time.monotonic() - start)
        assert used > 0.02, "the burner ran"
        assert snap.pids[burner.pid] == pytest.approx(used, rel=0.3), (snap, used)
        assert snap.jobs == pytest.approx(snap.pids[burner.pid], rel=0.2)
        assert snap.total >= snap.jobs, "the tree includes its child"
    finally:
        monitor.stop()
        burner.kill()
        burner.wait()


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


SPINNER: Final = "while True: pass"
DUTY_CYCLED: Final = """
import time
while True:
    end = time.process_time() + 0.01
    while time.process_time() < end:
        pass
    time.sleep(0.09)
"""
"""Needs 10 ms of CPU every ~100 ms: about a tenth of a core."""


def watched_beside_spinners(program: str, spinners: int) -> tuple[float, float]:
    """(usage, demand) of `program` sharing one CPU with `spinners` busy loops, over 2 s."""
    procs = [psutil.Popen([sys.executable, "-c", p]) for p in [program] + [SPINNER] * spinners]
    monitor = CpuLoadMonitor(0.25, 100, tree=True)
    try:
        for p in procs:
            os.sched_setaffinity(p.pid, {min(os.sched_getaffinity(0))})
        monitor.tracked = frozenset({procs[0].pid})
        monitor.start()
        time.sleep(2.0)
        snap = monitor.snapshot()
        return snap.pids[procs[0].pid], snap.demand[procs[0].pid]
    finally:
        monitor.stop()
        for p in procs:
            p.kill()
            p.wait()


def test_a_starved_process_demands_more_than_it_gets_and_the_monitor_says_so() -> None:
    """Three spinners on one CPU each get about a third of it but are runnable all the time:
    their usage would teach the worker that a job is cheap; their demand (usage + time waiting
    for the CPU) says what they need."""
    used, demand = watched_beside_spinners(SPINNER, 2)
    assert used < 0.6 and demand > 0.85, (used, demand)


def test_a_process_that_keeps_up_on_a_contended_cpu_demands_what_it_uses() -> None:
    """A job needing a tenth of a core waits behind two spinners for each slice, yet gets its
    work done and sleeps: its waits are latency, not unmet demand (counting them made a
    worker on a busy machine learn 0.56 core for jobs using 0.17)."""
    used, demand = watched_beside_spinners(DUTY_CYCLED, 2)
    assert 0.05 < used < 0.2, used
    assert demand == pytest.approx(used), (used, demand)


class ScriptedMonitor(CpuLoadMonitor):
    """A CPU monitor whose next snapshot the test sets."""

    def __init__(self) -> None:
        super().__init__(0.5, 5)
        self.next = CpuSnapshot()

    def snapshot(self, shared: frozenset[int] = frozenset()) -> CpuSnapshot:
        return self.next


@dataclass
class Handle:
    """What the load tracker reads of a running job."""

    pid: int
    memory_mb: float | None = None


async def scripted_tracker(
    monkeypatch: pytest.MonkeyPatch, idle_cpu: float
) -> tuple[LoadTracker, ScriptedMonitor]:
    """A tracker on 2 CPUs (threshold 0.7, no memory limit) whose monitor the test scripts,
    after one sample of the idle machine using `idle_cpu`; jobs count as grown at once."""
    monkeypatch.setattr(load_module, "COST_WARMUP_S", 0.0)
    monitor = ScriptedMonitor()
    budgets = Budgets(cpus=2.0, threshold=0.7, memory_mb=math.inf)
    tracker = LoadTracker(None, None, 0.5, 5, budgets, JobCost(0.25, 100.0), monitor=monitor)
    monitor.next = CpuSnapshot(total=idle_cpu)
    await tracker.sample()
    return tracker, monitor


async def test_a_job_costs_its_own_cpu_plus_what_the_machine_spends_beside_it_per_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the machine that also carries the calls' media and callers (a developer's box, the
    benches), a call costs more than its process: the CPU outside the job processes above what
    it is while the worker is idle is shared out among the running jobs, so the worker admits
    what the machine holds, not what its processes alone would."""
    tracker, monitor = await scripted_tracker(monkeypatch, idle_cpu=0.1)
    assert tracker.background() == pytest.approx(0.1)

    for pid in (101, 102):
        tracker.job_started(f"job-{pid}", Handle(pid))  # type: ignore[arg-type]
    own = {101: 0.2, 102: 0.2}
    callers = 0.2  # outside the job processes, there only while the calls are
    monitor.next = CpuSnapshot(total=0.1 + 0.4 + callers, pids=own, demand=own, jobs=0.4)
    await tracker.sample()
    assert tracker.cost.cpu == pytest.approx(0.2 + callers / 2)
    assert tracker.background() == pytest.approx(0.1), "the idle background, not the callers"
    assert tracker.capacity == math.floor((0.7 * 2 - 0.1) / 0.3)


async def test_jobs_sharing_a_process_each_cost_their_share_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With jobs_per_process > 1 several jobs report one pid: the process's demand is shared
    out among them, not counted once per job."""
    tracker, monitor = await scripted_tracker(monkeypatch, idle_cpu=0.0)
    for n in range(3):
        tracker.job_started(f"job-{n}", Handle(201))  # type: ignore[arg-type]
    host = {201: 0.6}
    monitor.next = CpuSnapshot(total=0.6, pids=host, demand=host, jobs=0.6)
    await tracker.sample()
    assert tracker.cost.cpu == pytest.approx(0.2)
    assert tracker.effective(0) == pytest.approx(0.6 / 2)
