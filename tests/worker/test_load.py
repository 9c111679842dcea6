"""Load: a load_fnc over load_threshold makes the worker FULL (and the server sends jobs
elsewhere), back under it AVAILABLE again; a failing load_fnc is logged once, not every tick;
the reservation rule for jobs the measure cannot see yet.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from livekit.protocol import agent

from callboard import Worker
from callboard.server.app import EmbeddedServer
from callboard.worker.load import DEFAULT_JOB_LOAD, custom_effective_load
from callboard.worker.options import LOAD_SAMPLE_INTERVAL_S
from callboard.worker.worker import WorkerState
from tests.worker.support import (
    control,
    fast_options,
    records_with,
    running_worker,
    server_worker,
    wait_until,
)


class Dial:
    """A load_fnc the test turns (it takes the worker, like livekit-agents' load_fnc)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.fail = False
        self.seen_workers: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, worker: Worker) -> float:
        with self._lock:
            self.seen_workers.add(id(worker))
            if self.fail:
                raise RuntimeError("load source unavailable")
            return self.value


async def test_load_over_the_threshold_is_full_and_jobs_go_elsewhere(
    server: EmbeddedServer,
) -> None:
    dial = Dial(0.9)
    opts = fast_options(server, load_fnc=dial, load_threshold=0.7)
    async with control(server) as ctl, running_worker(opts) as worker:
        session = server_worker(server, worker.id)
        await wait_until(lambda: session.status == agent.WS_FULL, "FULL on the server", 2.0)
        assert worker.state == WorkerState.FULL
        assert session.load == pytest.approx(0.9)
        assert dial.seen_workers == {id(worker)}, "load_fnc(worker) gets the worker"
        await ctl.create_room("while-full")
        failed = await ctl.wait_status("while-full", agent.JS_FAILED)
        assert failed.state.reason == agent.JSR_NO_CAPACITY

        dial.value = 0.1
        await wait_until(lambda: session.status == agent.WS_AVAILABLE, "AVAILABLE again", 2.0)
        await ctl.create_room("after")
        taken = await ctl.wait_status("after", agent.JS_RUNNING)
        assert taken.state.worker_id == worker.id


async def test_a_failing_load_fnc_is_logged_once_and_the_last_load_kept(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    dial = Dial(0.3)
    async with running_worker(fast_options(server, load_fnc=dial)) as worker:
        await wait_until(lambda: worker.load == pytest.approx(0.3), "the first sample", 2.0)
        dial.fail = True
        await wait_until(
            lambda: len(records_with(caplog.records, "load_fnc failed")) >= 1, "the failure"
        )
        await asyncio.sleep(4 * LOAD_SAMPLE_INTERVAL_S)  # four more failing ticks, no more logs
        assert len(records_with(caplog.records, "load_fnc failed")) == 1
        assert worker.load == pytest.approx(0.3)
        assert worker.registered
        dial.fail = False
        dial.value = 0.5
        await wait_until(lambda: worker.load == pytest.approx(0.5), "recovery", 2.0)
        assert len(records_with(caplog.records, "load_fnc works again")) == 1


def test_a_custom_load_reserves_for_jobs_not_yet_visible_in_it() -> None:
    assert custom_effective_load(0.0, 0, 0) == 0.0
    assert custom_effective_load(0.0, 0, 3) == pytest.approx(3 * DEFAULT_JOB_LOAD)
    # two running jobs cost 0.4: a reserved third counts as their average, 0.2
    assert custom_effective_load(0.4, 2, 1) == pytest.approx(0.6)
    assert custom_effective_load(0.9, 1, 5) == 1.0
    assert custom_effective_load(-0.5, 0, 0) == 0.0
