"""Admission on both servers: two callboard workers (one that has learned what a job costs,
one still on the prior) get a burst of three times the first one's capacity through
AgentDispatchService. Each takes about its capacity, every refusal is answered within 50 ms
(the worker's own histogram), and the calls one refuses are placed on the other, on
`callboard server` as on the real livekit-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import pytest
from livekit import api

from callboard import JobExecutorType, Worker, WorkerOptions
from callboard.worker.cost import COST_WARMUP_S
from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess
from tests.interop.support import unique, wait_until
from tests.worker.agents import jobs
from tests.worker.test_admission import CPU_BUDGET, DUTY, REFUSAL_S, THRESHOLD, answer_latencies

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

LEARN_JOBS: Final = 2
SETTLE_S: Final = 2.0
"""The burst is over when no offer has been answered for this long. Not every call is answered:
livekit-server offers a call to no one while every worker reports itself full."""


@asynccontextmanager
async def costed_worker(server: ServerProcess, agent_name: str) -> AsyncIterator[Worker]:
    """A worker with production admission on a one-CPU budget, running PROCESS jobs."""
    worker = Worker(
        WorkerOptions(
            entrypoint_fnc=jobs.scripted,
            prewarm_fnc=jobs.prewarm,
            job_executor_type=JobExecutorType.PROCESS,
            agent_name=agent_name,
            ws_url=server.ws_url,
            api_key=API_KEY,
            api_secret=API_SECRET,
            host="127.0.0.1",
            port=0,
            load_threshold=THRESHOLD,
            cpu_budget=CPU_BUDGET,
            num_idle_processes=2,
            shutdown_process_timeout=3.0,
            status_interval=0.5,
        )
    )
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.registered or run.done(), "registration", 15)
        yield worker
    finally:
        await worker.aclose()
        await run


async def dispatch(lk: api.LiveKitAPI, name: str, room: str, metadata: str) -> None:
    await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=name, room=room, metadata=metadata)
    )


def answered(worker: Worker) -> float:
    return sum(answer_latencies(worker, a)[1] for a in ("accepted", "refused"))


async def test_a_burst_is_taken_to_capacity_and_the_rest_spills_to_the_second_worker(
    lk_server: ServerProcess, lk: api.LiveKitAPI, tmp_path: Path
) -> None:
    name = unique("cb-costly")
    learned, done = tmp_path / "learned", tmp_path / "done"
    async with costed_worker(lk_server, name) as first:
        for _ in range(LEARN_JOBS):
            await dispatch(lk, name, unique("learn"), jobs.script(burn=DUTY, until=str(learned)))
        await wait_until(
            lambda: first.admission.model.cpu_measured, "the cost measured", COST_WARMUP_S + 15
        )
        await asyncio.to_thread(learned.touch)
        await wait_until(lambda: not first.active_jobs, "the learning jobs to end", 15)
        async with costed_worker(lk_server, name) as second:
            caps = [first.admission.capacity or 0, second.admission.capacity or 0]
            meta = jobs.script(burn=DUTY, until=str(done))
            rooms = [unique("burst") for _ in range(3 * caps[0])]
            await asyncio.gather(*(dispatch(lk, name, r, meta) for r in rooms))

            loop = asyncio.get_running_loop()
            last = (answered(first) + answered(second), loop.time())
            enough = min(len(rooms), sum(caps))

            def settled() -> bool:
                nonlocal last
                now = answered(first) + answered(second)
                if now != last[0]:
                    last = (now, loop.time())
                return now >= enough and loop.time() - last[1] >= SETTLE_S

            def tally() -> str:
                return (
                    f"{len(rooms)} calls dispatched; capacities {caps}; answered "
                    f"{answered(first):g} and {answered(second):g}; running "
                    f"{len(first.active_jobs)} and {len(second.active_jobs)}"
                )

            await wait_until(settled, "the burst answered", 20, tally)
            await wait_until(
                lambda: all(
                    len(w.active_jobs) >= c - 1 for w, c in zip((first, second), caps, strict=True)
                ),
                "the accepted jobs running",
                15,
            )
            running = [len(first.active_jobs), len(second.active_jobs)]
            for n, cap in zip(running, caps, strict=True):
                assert cap - 1 <= n <= cap + 1, (running, caps)
            assert sum(running) >= sum(caps) - 2, "the second worker took what the first refused"
            for w in (first, second):
                within, total = answer_latencies(w, "refused")
                assert within == total, f"{within:g} of {total:g} refusals within {REFUSAL_S}s"
            await asyncio.to_thread(done.touch)
