"""The fleet the cluster tests run: callboard workers as subprocesses (`agents/fleet_agent.py
start`, the way an operator runs them), their HTTP views, and the calls placed on the cluster.

Every worker of a test appends to one record file (see fleet_agent.py), so a call is followed
from its CreateDispatch to its job's start and end whichever worker, node or generation of the
fleet ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
from livekit import api

from tests.cluster.agents import fleet_agent
from tests.cluster.cluster import Cluster, Node
from tests.interop.livekit_server import API_KEY, API_SECRET, clean_env, free_port
from tests.interop.support import wait_until

AGENT_SCRIPT: Final = Path(fleet_agent.__file__)
AGENT_NAME: Final = "fleet"
REGISTER_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 10.0
HTTP_TIMEOUT_S: Final = 2.0
POLL_S: Final = 0.05
START_TIMEOUT_S: Final = 30.0
REPORT_SETTLE_S: Final = 10.0
"""A just-started job's load reservation lasts 2.5 s."""
ACTIVE_JOBS: Final = "callboard_active_jobs"


def read_records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass
class FleetWorker:
    """One `fleet_agent.py start` process: a callboard worker dialling `url`."""

    label: str
    url: str
    http_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def info(self) -> dict[str, Any] | None:
        """GET /worker (id, state, load, jobs), or None while it does not answer."""
        body = self._get("/worker")
        return json.loads(body) if body is not None else None

    def metrics(self) -> str:
        return self._get("/metrics") or ""

    def ready(self) -> bool:
        """GET /ready answers 200 (registered and not draining)."""
        return self._get("/ready") is not None

    def _get(self, path: str) -> str | None:
        try:
            url = f"http://127.0.0.1:{self.http_port}{path}"
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    @property
    def worker_id(self) -> str:
        info = self.info()
        return str(info["id"]) if info else ""

    def remember_tree(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)

    def signal(self, sig: signal.Signals) -> None:
        self.remember_tree()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM (drain), a second SIGTERM once it drains (jobs terminated now); after
        `grace` s SIGKILL whatever is left of its process tree (by PID)."""
        self.remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.ready() and time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(POLL_S)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        for p in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():  # same PID and start time: still the process we saw
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)

    def log_tail(self, limit: int = 2500) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            text = ""
        return f"--- worker {self.label} log tail ---\n{text}"


class Fleet:
    """The workers of one test, all recording to `record_path`, dialling `cluster`'s nodes
    through their fronts (None: each dials the URL it is given, e.g. `callboard server`)."""

    def __init__(
        self, cluster: Cluster | None, workdir: Path, max_jobs: int = 4, drain_s: float = 30
    ):
        self.cluster = cluster
        self.workdir = workdir
        self.record_path = workdir / "calls.jsonl"
        self.max_jobs = max_jobs
        self.drain_s = drain_s
        self.workers: list[FleetWorker] = []
        self._disagreement = ""

    def start(
        self, label: str, home: int, fixed_load: float | None = None, url: str | None = None
    ) -> FleetWorker:
        """A worker dialling node `home` through its own front (another node if it is down),
        or `url`; `fixed_load`: report this load instead of running jobs over the cap."""
        if url is None:
            assert self.cluster is not None, "a worker outside a cluster needs its url"
            url = self.cluster.front_for(home)
        port = free_port()
        log_path = self.workdir / f"worker-{label}.log"
        env = clean_env() | {
            "LIVEKIT_URL": url,
            "LIVEKIT_API_KEY": API_KEY,
            "LIVEKIT_API_SECRET": API_SECRET,
            "LIVEKIT_AGENT_NAME": AGENT_NAME,
            fleet_agent.RECORD_ENV: str(self.record_path),
            fleet_agent.LABEL_ENV: label,
            fleet_agent.MAX_JOBS_ENV: str(self.max_jobs),
            fleet_agent.HTTP_PORT_ENV: str(port),
            fleet_agent.DRAIN_ENV: str(self.drain_s),
        }
        if fixed_load is not None:
            env[fleet_agent.FIXED_LOAD_ENV] = str(fixed_load)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, str(AGENT_SCRIPT), "start"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        worker = FleetWorker(label, url, port, proc, log_path)
        self.workers.append(worker)
        return worker

    async def registered(
        self, worker: FleetWorker, timeout: float = REGISTER_TIMEOUT_S
    ) -> Node | None:
        """Until the worker is registered and, in a cluster, a node's log shows it; that node."""
        deadline = time.monotonic() + timeout
        while True:
            info = await asyncio.to_thread(worker.info)
            if info and info["id"] and info["state"] in ("available", "full"):
                if self.cluster is None:
                    return None
                node = self.cluster.node_of(str(info["id"]))
                if node is not None:
                    return node
            if worker.proc.poll() is not None:
                raise AssertionError(f"worker {worker.label} exited\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {worker.label} did not register\n{worker.log_tail()}")
            await asyncio.sleep(POLL_S)

    async def roll(
        self, workers: list[FleetWorker], homes: Sequence[int], exit_timeout: float
    ) -> list[int | None]:
        """Replace each worker in turn the way a Deployment with maxSurge 1 / maxUnavailable
        0 does: the new one registers, then the old one gets SIGTERM and drains. `workers` is
        updated in place; returns the old workers' exit codes (None: still running)."""
        codes: list[int | None] = []
        for i, old in enumerate(list(workers)):
            new = self.start(f"{old.label}-next", home=homes[i])
            await self.registered(new)
            old.signal(signal.SIGTERM)
            try:
                codes.append(await asyncio.to_thread(old.proc.wait, exit_timeout))
            except subprocess.TimeoutExpired:
                codes.append(None)
            workers[i] = new
        return codes

    async def all_started(self, calls: Sequence[Call]) -> Outcome:
        """Until every call's job started (fails with the logs after START_TIMEOUT_S)."""
        return await wait_until(
            lambda: (r := outcome(calls, self.records())).lost == 0 and r,
            f"all {len(calls)} calls started",
            START_TIMEOUT_S,
            self.log_tails,
        )

    async def reporting_settles(self, workers: Sequence[FleetWorker]) -> None:
        """Until each worker's /worker and /metrics agree with its calls (`reporting_matches`);
        fails with the last disagreement after REPORT_SETTLE_S."""
        for w in workers:
            await wait_until(
                functools.partial(self._reports_right, w),
                f"{w.label} reports its calls",
                REPORT_SETTLE_S,
                lambda: self._disagreement,
            )

    async def _reports_right(self, worker: FleetWorker) -> bool:
        self._disagreement = await reporting_matches(self, worker) or ""
        return not self._disagreement

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_records(self.record_path) if event is None or r["event"] == event]

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()

    def log_tails(self) -> str:
        nodes = self.cluster.log_tails() if self.cluster is not None else ""
        return "\n".join(w.log_tail() for w in self.workers) + "\n" + nodes


@dataclass
class Call:
    """One CreateDispatch into a new room, and what became of it."""

    room: str
    node: int
    """Index of the node whose API took the CreateDispatch."""
    sent_at: float
    dispatch_id: str = ""
    error: str = ""


class Caller:
    """Places calls (explicit dispatches of the fleet's agent) through every node's API in
    turn, and reads their outcomes from the fleet's records."""

    def __init__(self, nodes: Sequence[Node], prefix: str = "call") -> None:
        self._clients = [(n, api.LiveKitAPI(n.http_url, API_KEY, API_SECRET)) for n in nodes]
        self._prefix = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self._next = 0
        self.calls: list[Call] = []

    async def aclose(self) -> None:
        for _, client in self._clients:
            await client.aclose()

    async def place(
        self, hold: float | None, via: int | None = None, room: str | None = None
    ) -> Call:
        """One call held `hold` s (None: until terminated), via node `via` or the next one,
        into a new room or into `room`."""
        live = [(n, c) for n, c in self._clients if n.running]
        node, client = self._clients[via] if via is not None else live[len(self.calls) % len(live)]
        room = room or f"{self._prefix}-{len(self.calls)}"
        call = Call(room, node.index, time.time())
        self.calls.append(call)
        try:
            d = await client.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name=AGENT_NAME, room=room, metadata=json.dumps({"hold": hold})
                )
            )
            call.dispatch_id = d.id
        except Exception as e:  # a refused call is an outcome the test reports
            call.error = f"{type(e).__name__}: {e}"
        return call

    async def place_until(self, stop: asyncio.Event, rate: float, hold: float) -> None:
        """`rate` calls per second, on a fixed schedule, until `stop` is set."""
        loop = asyncio.get_running_loop()
        start, k = loop.time(), 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
            await self.place(hold)
            k += 1


@dataclass
class Outcome:
    """What the records say about a set of calls, each by its dispatch id."""

    placed: int
    started: dict[str, dict[str, Any]]
    done: dict[str, dict[str, Any]]
    ended: dict[str, dict[str, Any]]
    """The job's `shutdown` record (every end, natural or not)."""

    @property
    def lost(self) -> int:
        return self.placed - len(self.started)

    @property
    def cut_short(self) -> list[str]:
        return sorted(d for d in self.started if d not in self.done)


def outcome(calls: Sequence[Call], records: Sequence[dict[str, Any]]) -> Outcome:
    ids = {c.dispatch_id for c in calls if c.dispatch_id}

    def by_dispatch(event: str) -> dict[str, dict[str, Any]]:
        return {
            r["dispatch_id"]: r for r in records if r["event"] == event and r["dispatch_id"] in ids
        }

    return Outcome(len(calls), by_dispatch("start"), by_dispatch("done"), by_dispatch("shutdown"))


def running_jobs(records: Sequence[dict[str, Any]], label: str) -> int:
    """Jobs of worker `label` that started and have not ended, by the records."""
    started = {r["job_id"] for r in records if r["event"] == "start" and r["worker"] == label}
    ended = {r["job_id"] for r in records if r["event"] == "shutdown" and r["worker"] == label}
    return len(started - ended)


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def reporting_matches(fleet: Fleet, worker: FleetWorker) -> str | None:
    """What is wrong with what `worker` reports (/worker, /metrics) against its running calls
    by the records, or None when it all agrees: job count, load = jobs / cap, FULL at the cap.
    (Right after a job starts the load carries a reservation: check once calls settled.)"""
    info = await asyncio.to_thread(worker.info)
    text = await asyncio.to_thread(worker.metrics)
    if info is None:
        return f"{worker.label}: /worker does not answer"
    jobs = running_jobs(fleet.records(), worker.label)
    load = jobs / fleet.max_jobs
    want_state = "full" if jobs >= fleet.max_jobs else "available"
    got = (len(info["jobs"]), round(info["load"], 3), info["state"], metric(text, ACTIVE_JOBS))
    want = (jobs, round(load, 3), want_state, float(jobs))
    return None if got == want else f"{worker.label}: reports {got}, records say {want}"
