"""The warm pool follows demand: after a burst it keeps as many prewarmed processes as the
burst had jobs (within its memory budget, at the measured idle PSS), and shrinks back to
num_idle_processes once no burst has come for idle_processes_window; the sizing rules as pure
functions.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

from livekit.protocol import agent

from callboard import JobExecutorType
from callboard.job.pool import (
    IDLE_PSS_PRIOR_MB,
    ProcessExecutor,
    idle_processes_for,
    idle_within_budget,
)
from callboard.server.app import EmbeddedServer
from callboard.worker.warm_pool import Demand, warm_target
from tests.worker.agents.jobs import script
from tests.worker.support import (
    control,
    fast_options,
    no_leftover_children,
    running_worker,
    wait_until,
)

AGENT: Final = "pooled"
BURST: Final = 8
WINDOW_S: Final = 16.0
"""Long enough to fork and measure the grown pool on a busy machine before it shrinks."""
POOL_BUDGET_MB: Final = 2.5 * IDLE_PSS_PRIOR_MB
"""Room for two processes at the prior, for more once they are measured (a test agent's idle
process measures ~9 MB), and still fewer than the burst."""


async def test_the_pool_grows_after_a_burst_within_its_budget_and_shrinks_when_idle(
    server: EmbeddedServer,
) -> None:
    opts = fast_options(
        server,
        JobExecutorType.PROCESS,
        agent_name=AGENT,
        num_idle_processes=1,
        idle_processes_window=WINDOW_S,
        idle_processes_memory_mb=POOL_BUDGET_MB,
    )
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(opts) as worker,
    ):
        pool = worker.executor
        assert isinstance(pool, ProcessExecutor)
        await wait_until(lambda: pool.idle_count == 1, "the configured pool")
        rooms = [f"rush-{i}" for i in range(BURST)]
        loop = asyncio.get_running_loop()
        dispatched = loop.time()
        await asyncio.gather(*(ctl.dispatch(r, AGENT, script(sleep=0.2)) for r in rooms))
        for r in rooms:
            await ctl.wait_status(r, agent.JS_SUCCESS, agent_name=AGENT)

        await wait_until(
            lambda: pool.idle_count > 1 and all(m is not None for m in idle_memories(pool)),
            "the pool to grow after the burst, measured",
            timeout=WINDOW_S * 0.75,
        )
        pss = max(m for m in idle_memories(pool) if m is not None)
        assert pool.idle_target == min(BURST, int(POOL_BUDGET_MB // pss))
        await wait_until(
            lambda: pool.idle_count == pool.idle_target, "the pool at its target", WINDOW_S * 0.15
        )
        assert pool.idle_count > 1, "grown after the burst"
        assert pool.idle_memory_mb <= POOL_BUDGET_MB, "the idle processes keep to the budget"

        await wait_until(lambda: pool.idle_count == 1, "the pool to shrink back", WINDOW_S + 5.0)
        assert loop.time() - dispatched >= WINDOW_S, "not before the window has passed"


def idle_memories(pool: ProcessExecutor) -> list[float | None]:
    return [p.memory_mb for p in pool._idle]


def test_the_warm_target_follows_bursts_within_the_room_for_jobs() -> None:
    assert warm_target(2, burst=0, room=math.inf, draining=False) == 2
    assert warm_target(2, burst=6, room=math.inf, draining=False) == 6
    assert warm_target(2, burst=6, room=4, draining=False) == 4, "no more than can be admitted"
    assert warm_target(2, burst=6, room=0, draining=False) == 0
    assert warm_target(2, burst=6, room=-3, draining=False) == 0
    assert warm_target(4, burst=6, room=math.inf, draining=True) == 0


def test_a_process_per_job_keeps_an_idle_process_per_warm_job() -> None:
    assert idle_processes_for(2, free_places=0, jobs_per_process=1) == 2
    assert idle_processes_for(0, free_places=0, jobs_per_process=1) == 0


def test_with_several_jobs_a_process_idle_processes_cover_what_busy_ones_cannot() -> None:
    assert idle_processes_for(6, free_places=0, jobs_per_process=3) == 2
    assert idle_processes_for(7, free_places=0, jobs_per_process=3) == 3
    assert idle_processes_for(2, free_places=0, jobs_per_process=8) == 1
    assert idle_processes_for(2, free_places=7, jobs_per_process=8) == 0, "a busy one has room"
    assert idle_processes_for(6, free_places=1, jobs_per_process=3) == 2


def test_a_burst_is_the_most_jobs_within_a_second_in_the_window() -> None:
    demand = Demand(window=10.0)
    for t in (0.0, 0.1, 0.2, 0.3, 5.0, 5.5):
        demand.admitted(t)
    assert demand.burst(6.0) == 4
    assert demand.burst(10.25) == 2, "the first burst is forgotten after the window"
    assert demand.burst(20.0) == 0


def test_the_memory_budget_bounds_the_pool() -> None:
    assert idle_within_budget(8, idle_pss_mb=10.0, budget_mb=35.0) == 3
    assert idle_within_budget(2, idle_pss_mb=10.0, budget_mb=35.0) == 2
    assert idle_within_budget(8, idle_pss_mb=10.0, budget_mb=0.0) == 8, "0: no budget"
    assert idle_within_budget(8, idle_pss_mb=50.0, budget_mb=35.0) == 0
