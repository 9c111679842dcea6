"""What a job costs: the prior until a measure, then a moving average; how many jobs fit; a
capacity estimate that does not flap at a boundary; and the CPU monitor measuring a real
process's own share of a core, off the event loop.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Final

import psutil
import pytest

from callboard.worker.cost import (
    COST_TIME_CONSTANT_S,
    CostModel,
    JobCost,
    jobs_that_fit,
    settle,
)
from callboard.worker.machine import CpuLoadMonitor

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


def test_a_starved_process_demands_more_than_it_gets_and_the_monitor_says_so() -> None:
    """Three spinners on one CPU each get about a third of it but are runnable all the time:
    their usage would teach the worker that a job is cheap; their demand (usage + time waiting
    for the CPU) says what they need."""
    spinners = [psutil.Popen([sys.executable, "-c", SPINNER]) for _ in range(3)]
    monitor = CpuLoadMonitor(0.25, 100, tree=True)
    try:
        for s in spinners:
            os.sched_setaffinity(s.pid, {min(os.sched_getaffinity(0))})
        monitor.tracked = frozenset({spinners[0].pid})
        monitor.start()
        time.sleep(2.0)
        snap = monitor.snapshot()
        pid = spinners[0].pid
        assert snap.pids[pid] < 0.6, snap
        assert snap.demand[pid] > 0.85, snap
    finally:
        monitor.stop()
        for s in spinners:
            s.kill()
            s.wait()
