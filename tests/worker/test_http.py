"""The worker's HTTP server: `/` liveness, `/ready` (registered and not draining), `/worker`
JSON and `/metrics` in Prometheus text, read through a real job on the PROCESS executor.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit.protocol import agent
from prometheus_client.parser import text_string_to_metric_families

from callboard import JobExecutorType, Worker
from callboard.server.app import EmbeddedServer
from tests.worker.agents.jobs import script
from tests.worker.support import (
    control,
    fast_options,
    no_leftover_children,
    running_worker,
    wait_until,
)

AGENT = "http-agent"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, worker: Worker, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{worker.http_port}{path}") as resp:
        return resp.status, await resp.text()


async def get_json(http: aiohttp.ClientSession, worker: Worker, path: str) -> dict[str, Any]:
    status, body = await get(http, worker, path)
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def metrics(http: aiohttp.ClientSession, worker: Worker) -> Samples:
    async with http.get(f"http://127.0.0.1:{worker.http_port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not in {sorted(k[0] for k in samples)}"
    return samples[key]


async def test_ready_is_503_until_registered(
    server: EmbeddedServer, http: aiohttp.ClientSession
) -> None:
    worker = Worker(fast_options(server), register=False)
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port != 0, "the HTTP server to listen")
        assert await get(http, worker, "/") == (200, "OK")
        assert await get(http, worker, "/ready") == (503, "not registered with the server")
        info = await get_json(http, worker, "/worker")
        assert info["id"] == "" and info["state"] == "connecting" and info["jobs"] == []
    finally:
        worker.request_shutdown()
        await asyncio.wait_for(run, 10.0)


async def test_http_endpoints_through_a_process_job(
    server: EmbeddedServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    opts = fast_options(server, JobExecutorType.PROCESS, agent_name=AGENT, num_idle_processes=1)
    async with (
        no_leftover_children(),
        control(server) as ctl,
        running_worker(opts) as worker,
    ):
        assert worker.http_port > 0
        assert await get(http, worker, "/") == (200, "OK")
        assert await get(http, worker, "/ready") == (200, "ready")

        await ctl.dispatch("http-room", AGENT, script(until=str(release)))
        job = await ctl.wait_status("http-room", agent.JS_RUNNING, agent_name=AGENT)
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run")

        info = await get_json(http, worker, "/worker")
        assert info["id"] == worker.id and info["id"].startswith("AW_")
        assert info["state"] == "available" and info["draining"] is False
        assert info["agent_name"] == AGENT
        assert 0.0 <= info["load"] <= 1.0
        assert isinstance(info["capacity"], int) and info["capacity"] >= 1
        assert info["job_cost"] == {"cpu": 0.25, "memory_mb": 100.0, "measured": False}
        assert info["uptime_s"] > 0
        (listed,) = info["jobs"]
        assert listed["id"] == job.id and listed["room"] == "http-room"
        pid = listed["pid"]
        assert isinstance(pid, int) and pid != os.getpid()
        assert listed["running_s"] >= 0

        m = await metrics(http, worker)
        assert sample(m, "callboard_active_jobs") == 1
        assert sample(m, "callboard_job_offers_total") == 1
        assert sample(m, "callboard_job_start_latency_seconds_count") == 1
        assert 0 < sample(m, "callboard_job_start_latency_seconds_sum") < 10
        assert sample(m, "callboard_job_start_latency_seconds_bucket", le="+Inf") == 1
        assert 0.0 <= sample(m, "callboard_worker_load") <= 1.0
        assert sample(m, "callboard_offer_answer_seconds_count", answer="accepted") == 1
        assert sample(m, "callboard_worker_capacity_jobs") == info["capacity"]
        assert sample(m, "callboard_job_cost_cpu_cores") == 0.25
        assert sample(m, "callboard_job_cost_memory_bytes") == 100 * 1024 * 1024
        assert sample(m, "callboard_warm_pool_target") >= 0
        total = sample(m, "callboard_processes", state="total")
        assert total >= 2, "the zygote and the job's process"
        assert 0 <= sample(m, "callboard_processes", state="idle") < total
        assert sample(m, "callboard_process_memory_bytes", pid=str(pid), kind="rss") > 1e6
        assert sample(m, "callboard_process_memory_bytes", pid=str(pid), kind="uss") > 0

        release.touch()
        await ctl.wait_status("http-room", agent.JS_SUCCESS, agent_name=AGENT)
        await ctl.dispatch("failing-room", AGENT, script(**{"raise": "agent bug"}))
        await ctl.wait_status("failing-room", agent.JS_FAILED, agent_name=AGENT)
        await wait_until(lambda: not worker.active_jobs, "both jobs to end")
        m = await metrics(http, worker)
        assert sample(m, "callboard_active_jobs") == 0
        assert sample(m, "callboard_jobs_total", outcome="success") == 1
        assert sample(m, "callboard_jobs_total", outcome="failed") == 1
        assert (await get_json(http, worker, "/worker"))["jobs"] == []

        # draining: not ready any more, still alive
        await ctl.dispatch("last-room", AGENT, script(sleep=0.5))
        await wait_until(lambda: len(worker.active_jobs) == 1, "the last job to run")
        draining = asyncio.create_task(worker.drain(5.0))
        await wait_until(lambda: worker.draining, "the drain to start")
        assert await get(http, worker, "/ready") == (503, "draining")
        assert await get(http, worker, "/") == (200, "OK")
        info = await get_json(http, worker, "/worker")
        assert info["state"] == "draining" and info["draining"] is True
        await asyncio.wait_for(draining, 5.0)
