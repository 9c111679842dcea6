"""Admission by what a job costs, with real job processes that burn a set share of a core:
the worker learns the cost, accepts a burst of 3x its capacity up to that capacity (±1),
refuses the rest at once (without asking request_fnc), and a second worker takes the refused
calls. The CPU budget is an option (counted on this worker's own processes), so the figures do
not depend on what else the machine runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import psutil
import pytest
from livekit.protocol import agent

from callboard import JobExecutorType, JobRequest, Worker
from callboard.server.app import EmbeddedServer
from callboard.worker.cost import COST_WARMUP_S
from tests.worker.agents.jobs import script
from tests.worker.support import (
    Control,
    control,
    fast_options,
    no_leftover_children,
    records_with,
    running_worker,
    server_worker,
    wait_until,
)

AGENT: Final = "costly"
CPU_BUDGET: Final = 1.0
THRESHOLD: Final = 0.7
DUTY: Final = 0.15
"""Each job keeps 0.15 core busy: floor(0.7 / 0.15) = 4 jobs fit in one CPU at 0.7, with
room either side of the boundary (3.5 and 5 jobs would need 0.2 and 0.14 core)."""
REFUSAL_S: Final = 0.05
LEARN_JOBS: Final = 2
LEARN_DEADLINE_S: Final = COST_WARMUP_S + 10.0
QUIET_LOAD: Final = 0.2
RATE_SPAN_S: Final = 1.5

pytestmark = pytest.mark.timeout(120)


class CountingRequests:
    """A request_fnc that accepts, counting the offers it was asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, req: JobRequest) -> None:
        self.asked.append(req.id)
        await req.accept()


def costed_options(server: EmbeddedServer, **overrides: Any) -> Any:
    """Production admission (load_threshold 0.7, the CPU measure, no load_fnc) on a budget of
    one CPU, with PROCESS jobs."""
    values: dict[str, Any] = {
        "load_fnc": None,
        "load_threshold": THRESHOLD,
        "cpu_budget": CPU_BUDGET,
        "agent_name": AGENT,
        "num_idle_processes": 2,
        **overrides,
    }
    return fast_options(server, JobExecutorType.PROCESS, **values)


async def learn_the_cost(ctl: Control, worker: Worker, release: Path) -> float:
    """Run LEARN_JOBS burning jobs until the worker has measured them, then end them and wait
    for the measured load to settle. Returns the CPU rate the jobs really had, from their
    processes' CPU times (on a busy machine a job may get less than its DUTY)."""
    for i in range(LEARN_JOBS):
        await ctl.dispatch(f"learn-{i}", AGENT, script(burn=DUTY, until=str(release)))
    await wait_until(
        lambda: worker.admission.model.cpu_measured, "the job cost measured", LEARN_DEADLINE_S
    )
    procs = [psutil.Process(j.handle.pid) for j in worker.active_jobs if j.handle.pid]
    loop = asyncio.get_running_loop()
    before, start = sum(cpu_s(p) for p in procs), loop.time()
    await asyncio.sleep(RATE_SPAN_S)
    rate = (sum(cpu_s(p) for p in procs) - before) / (loop.time() - start) / len(procs)
    await asyncio.to_thread(release.touch)
    await wait_until(lambda: not worker.active_jobs, "the learning jobs to end")
    await wait_until(
        lambda: worker.admission.measured < QUIET_LOAD, "the measured load to settle", 10.0
    )
    return rate


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def burst(
    ctl: Control,
    rooms: list[str],
    release: Path,
    answered: Callable[[], Awaitable[None]] | None = None,
) -> list[agent.Job]:
    """Dispatch a burning job to each room at once; each job once placed or refused.
    `answered` runs as soon as the dispatches are made."""
    meta = script(burn=DUTY, until=str(release))
    await asyncio.gather(*(ctl.dispatch(r, AGENT, meta) for r in rooms))
    if answered is not None:
        await answered()
    return [
        await ctl.wait_job(
            r,
            lambda j: j.state.status != agent.JS_PENDING,
            "placed or refused",
            agent_name=AGENT,
            timeout=10.0,
        )
        for r in rooms
    ]


def answer_latencies(worker: Worker, answer: str) -> tuple[float, float]:
    """(answers within REFUSAL_S, all answers) of one kind, from the worker's own histogram."""
    within = total = 0.0
    for metric in worker.metrics.answer_latency.collect():
        for s in metric.samples:
            if s.labels.get("answer") != answer:
                continue
            if s.name.endswith("_bucket") and float(s.labels["le"]) == REFUSAL_S:
                within = s.value
            elif s.name.endswith("_count"):
                total = s.value
    return within, total


async def test_a_burst_of_three_times_capacity_is_accepted_to_capacity_and_refused_fast(
    server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    requests = CountingRequests()
    opts = costed_options(server, request_fnc=requests)
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(opts) as worker,
    ):
        assert worker.admission.capacity == math.floor(THRESHOLD * CPU_BUDGET / 0.25), (
            "before any job is measured, the prior (0.25 core) bounds a first burst"
        )
        real = await learn_the_cost(ctl, worker, tmp_path / "learned")
        cost = worker.admission.cost.cpu
        assert cost == pytest.approx(real, rel=0.35), f"learned {cost:.3f}, used {real:.3f}"
        assert cost <= 1.3 * DUTY
        capacity = worker.admission.capacity
        background = worker.admission.background()
        assert capacity <= math.floor(THRESHOLD * CPU_BUDGET / cost + 1e-9)
        assert capacity >= math.floor((THRESHOLD * CPU_BUDGET - background) / cost) - 1
        assert len(records_with(caplog.records, "capacity")) >= 2, "at start, and learned"

        requests.asked.clear()
        rooms = [f"burst-{i}" for i in range(3 * capacity)]
        session = server_worker(server, worker.id)
        loads: list[tuple[float, float]] = []

        async def reported_load() -> None:
            """Right after the burst is answered, while every accepted job is still young: the
            load the server hears reserves the learned cost for each."""
            await wait_until(
                lambda: (
                    sum(answer_latencies(worker, a)[1] for a in ("accepted", "refused"))
                    >= len(rooms)
                ),
                "every offer answered",
            )
            reserved = len(worker.active_jobs) * cost / CPU_BUDGET
            await wait_until(lambda: session.load >= 0.95 * reserved, "the load reported", 2.0)
            loads.append((session.load, reserved))

        placed = await burst(ctl, rooms, tmp_path / "done", reported_load)
        assert loads, "the reported load was checked"
        running = [j for j in placed if j.state.status == agent.JS_RUNNING]
        refused = [j for j in placed if j.state.status == agent.JS_FAILED]
        assert capacity - 1 <= len(running) <= capacity + 1, (len(running), capacity)
        assert len(running) + len(refused) == len(rooms)
        assert all(j.state.reason == agent.JSR_NO_CAPACITY for j in refused)
        assert len(requests.asked) == len(running), "refused without asking request_fnc"
        within, total = answer_latencies(worker, "refused")
        assert total >= len(refused) and within == total, (
            f"{within:g} of {total:g} refusals answered within {REFUSAL_S * 1000:g} ms"
        )
        await wait_until(
            lambda: (session.status == agent.WS_FULL) == (worker.capacity_problem() is not None),
            "FULL on the server exactly when no further job fits",
            5.0,
        )
        await asyncio.to_thread((tmp_path / "done").touch)


async def test_with_two_workers_the_calls_one_refuses_land_on_the_other(
    server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(costed_options(server)) as first,
    ):
        await learn_the_cost(ctl, first, tmp_path / "learned")
        async with running_worker(costed_options(server)) as second:
            caps = {first.id: first.admission.capacity, second.id: second.admission.capacity}
            assert all(c is not None for c in caps.values())
            rooms = [f"spill-{i}" for i in range(3 * (caps[first.id] or 0))]
            placed = await burst(ctl, rooms, tmp_path / "done")
            by_worker = {first.id: 0, second.id: 0}
            for j in placed:
                if j.state.status == agent.JS_RUNNING:
                    by_worker[j.state.worker_id] += 1
            for wid, n in by_worker.items():
                assert (caps[wid] or 0) - 1 <= n <= (caps[wid] or 0) + 1, (by_worker, caps)
            refused_by = {
                wid: {r.__dict__["job_id"] for r in rejections(caplog, wid)} for wid in by_worker
            }
            running_on = {
                wid: {j.id for j in placed if j.state.status == agent.JS_RUNNING}
                & {j.id for j in placed if j.state.worker_id == wid}
                for wid in by_worker
            }
            assert not refused_by[first.id] & running_on[first.id]
            assert not refused_by[second.id] & running_on[second.id]
            placed_ids = running_on[first.id] | running_on[second.id]
            assert len(placed_ids) >= sum(c or 0 for c in caps.values()) - 2, (
                "the calls beyond one worker's capacity were placed on the other"
            )
            for j in placed:
                if j.id not in placed_ids:
                    assert j.state.reason == agent.JSR_NO_CAPACITY
                    assert j.id in refused_by[first.id] | refused_by[second.id]
            assert not records_with(caplog.records, "worker did not answer the availability")
            await asyncio.to_thread((tmp_path / "done").touch)


def rejections(caplog: pytest.LogCaptureFixture, worker_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in records_with(caplog.records, "rejecting job")
        if r.__dict__.get("worker_id") == worker_id
    ]
