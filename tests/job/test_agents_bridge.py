"""An agent that imports livekit.agents runs with livekit-agents' own job context semantics:
its context variable (in the entrypoint and its tasks), its HTTP session context (open until
the job is closed), livekit-agents' JobContext and JobProcess, and the inference runners its
plugins register served by callboard's shared inference process through
`ctx.inference_executor`. Run as a real agent script (`python livekit_agents_agent.py dev`)
against the embedded server, with each executor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import psutil
import pytest
from livekit.protocol import agent

from callboard.server.app import EmbeddedServer
from tests.conftest import API_KEY, API_SECRET
from tests.job.agents import BRIDGE_EXECUTOR_ENV, BRIDGE_REPORT_ENV
from tests.job.support import api_client, dispatch_and_wait, until

SCRIPT: Final = Path(__file__).with_name("livekit_agents_agent.py")
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
REGISTER_TIMEOUT_S: Final = 60.0  # livekit-agents imports for seconds on a busy machine
EXIT_TIMEOUT_S: Final = 20.0

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def agent_script(
    server: EmbeddedServer, report: Path, executor: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "PYTHONPATH": str(REPO_ROOT),
        BRIDGE_REPORT_ENV: str(report),
        BRIDGE_EXECUTOR_ENV: executor,
    }
    env.pop("LIVEKIT_DEV_MODE", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "dev",
        "--log-level",
        "INFO",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def events(report: Path, event: str) -> list[dict[str, Any]]:
    lines = report.read_text().splitlines() if report.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == event]


def zygote_threads(proc: asyncio.subprocess.Process) -> list[int]:
    out = []
    for child in psutil.Process(proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if "callboard.job.zygote" in " ".join(child.cmdline()):
                out.append(child.num_threads())
    return out


@pytest.mark.parametrize("executor", ["process", "thread"])
async def test_a_livekit_agents_agent_gets_livekit_agents_job_context(
    server: EmbeddedServer, tmp_path: Path, executor: str
) -> None:
    report = tmp_path / "report.jsonl"
    async with agent_script(server, report, executor) as proc, api_client(server) as lk:
        await until(lambda: bool(server.engine.workers), "registration", REGISTER_TIMEOUT_S)
        state = await dispatch_and_wait(lk, "call-bridged", timeout=30)
        await until(lambda: bool(events(report, "shutdown")), "the shutdown callback")
        threads = zygote_threads(proc)
    assert (state.status, state.error) == (agent.JS_SUCCESS, "")
    (entry,) = events(report, "entry")
    assert entry["room"] == "call-bridged" and entry["token_identity"] == f"agent-{entry['job_id']}"
    seen = {k: entry[k] for k in ("livekit_context", "livekit_process", "get_job_context")}
    assert seen == dict.fromkeys(seen, True)
    assert entry["in_task"] and entry["http_session_open"] and entry["prewarmed_here"]
    result, served_by = entry["inference"].split("|")
    assert result == "ABC"
    assert entry["dev_mode"] == "1"  # `dev`, as livekit-agents' dev sets it
    (shutdown,) = events(report, "shutdown")
    assert shutdown["reason"] == "job finished" and shutdown["http_session_open"]
    if executor == "process":
        assert int(served_by) != entry["pid"]  # the shared inference process, not the job
        assert entry["pid"] != proc.pid and entry["api_url"] == server.url
        assert threads == [1]  # livekit.agents imported, the zygote still forks safely
    else:
        assert int(served_by) == entry["pid"] == proc.pid
