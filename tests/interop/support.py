"""Helpers shared by the interop tests: polling, names, tokens, and the livekit-agents worker
subprocess (tests/interop/agents/record_agent.py) with the jobs it records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil
from livekit import api

from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess, clean_env

T = TypeVar("T")

AGENT_SCRIPT: Final = Path(__file__).parent / "agents" / "record_agent.py"
RECORD_ENV: Final = "CALLBOARD_INTEROP_RECORD"
AGENT_NAME_ENV: Final = "CALLBOARD_INTEROP_AGENT_NAME"
# livekit-agents imports for seconds and starts job processes slowly on a busy machine.
REGISTER_TIMEOUT_S: Final = 60.0
JOB_TIMEOUT_S: Final = 30.0
# How long a job may take to show up in the real server's ListDispatch after it was assigned.
LISTED_TIMEOUT_S: Final = 20.0
WORKER_STOP_GRACE_S: Final = 15.0
POLL_S: Final = 0.05


def unique(prefix: str) -> str:
    """A room name no other test uses (servers are shared by the tests of a session)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token(**grants: Any) -> str:
    """A Twirp access token for the dev key with these video grants."""
    return api.AccessToken(API_KEY, API_SECRET).with_grants(api.VideoGrants(**grants)).to_jwt()


async def wait_until(
    probe: Callable[[], T | None] | Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float,
    context: Callable[[], str] = lambda: "",
) -> T:
    """Poll `probe` (sync or async) until it returns something truthy; that value.

    Fails with `what` (and `context()`, e.g. a log tail) when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{context()}")
        await asyncio.sleep(POLL_S)


@dataclass
class AgentWorker:
    """A `python record_agent.py start` subprocess: a real livekit-agents worker."""

    agent_name: str
    proc: subprocess.Popen[bytes]
    record_path: Path
    log_path: Path

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.record_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if event is None or r["event"] == event]

    @property
    def worker_id(self) -> str:
        registered = self.events("registered")
        return str(registered[-1]["worker_id"]) if registered else ""

    def job_in(self, room: str) -> dict[str, Any] | None:
        """The job this worker ran for `room` (the `job` record), if any."""
        jobs = [j for j in self.events("job") if j["room"] == room]
        assert len(jobs) <= 1, f"{self.agent_name!r} got {len(jobs)} jobs for {room}: {jobs}"
        return jobs[0] if jobs else None

    def shutdown_of(self, job_id: str) -> dict[str, Any] | None:
        ends = [e for e in self.events("shutdown") if e["job_id"] == job_id]
        return ends[0] if ends else None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            text = ""
        return f"--- {self.agent_name or '(unnamed)'} worker log tail ---\n{text}"


def start_agent_worker(server: ServerProcess, agent_name: str, workdir: Path) -> AgentWorker:
    """Start a livekit-agents worker for `server`; does not wait for its registration."""
    label = agent_name or "unnamed"
    record_path = workdir / f"{label}.jsonl"
    log_path = workdir / f"{label}.log"
    env = clean_env() | {
        "LIVEKIT_URL": server.ws_url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        RECORD_ENV: str(record_path),
        AGENT_NAME_ENV: agent_name,
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(AGENT_SCRIPT), "start"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    return AgentWorker(agent_name, proc, record_path, log_path)


def wait_registered(workers: list[AgentWorker], timeout: float = REGISTER_TIMEOUT_S) -> None:
    """Block until every worker recorded its registration; fail early if one exits."""
    deadline = time.monotonic() + timeout
    for w in workers:
        while not w.worker_id:
            if w.proc.poll() is not None:
                raise RuntimeError(f"agent worker exited with {w.proc.returncode}\n{w.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent worker did not register in {timeout:g}s\n{w.log_tail()}")
            time.sleep(0.1)


def stop_agent_worker(worker: AgentWorker, grace: float = WORKER_STOP_GRACE_S) -> None:
    """SIGTERM the worker (it drains, then closes its job processes); after `grace` seconds
    SIGKILL, by PID, whatever is left of it and of the processes it had started."""
    try:
        family = [psutil.Process(worker.proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if worker.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=grace)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running():  # same PID and start time: still the process we saw
                p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(timeout=grace)
