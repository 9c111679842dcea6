"""What the side-by-side benchmarks (ours vs livekit-agents) share: the agent worker subprocess
and its process tree, the server's log as the source of registration and job-end events, a
dispatch client that can fire a burst at once, settling, and the figures table.

The two agent scripts (`bench/agents/ours_agent.py`, `bench/agents/theirs_agent.py`) differ
only in their import. Every worker listens on 127.0.0.1 and is stopped by PID: SIGTERM to the
worker, then SIGKILL to every process of its tree that is still running (livekit-agents' job
processes can outlive their forkserver, so every process ever seen in the tree is remembered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import psutil
from livekit import api
from livekit.protocol import agent_dispatch
from livekit.protocol import room as room_pb

from bench._common import LOOPBACK, HttpConnection, ServerProcess, http_request, percentile
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET

SIDES: Final = ("ours", "theirs")
MODES: Final = ("start", "dev")
AGENTS_DIR: Final = Path(__file__).resolve().parent / "agents"
# The environment the agent scripts read (see bench/agents/ours_agent.py).
RECORD_ENV: Final = "BENCH_RECORD"
AGENT_NAME_ENV: Final = "BENCH_AGENT_NAME"
LOAD_THRESHOLD_ENV: Final = "BENCH_LOAD_THRESHOLD"
ZERO_LOAD_ENV: Final = "BENCH_ZERO_LOAD"
NUM_IDLE_ENV: Final = "BENCH_NUM_IDLE"

REGISTER_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 5.0
POLL_S: Final = 0.02
SETTLE_QUIET_S: Final = 1.5
"""A tree is settled when its set of processes has not changed for this long..."""
SETTLE_CPU_FRACTION: Final = 0.05
"""...and it used less than this fraction of one core meanwhile."""
SETTLE_TIMEOUT_S: Final = 60.0
MB: Final = 1024 * 1024
CONNECTION_SETTLE_S: Final = 0.1
DISPATCH_PATH: Final = "/twirp/livekit.AgentDispatchService/CreateDispatch"
CREATE_ROOM_PATH: Final = "/twirp/livekit.RoomService/CreateRoom"
PROTOBUF: Final = "application/protobuf"


def parse_log_time(text: str) -> float:
    """`2026-11-24T22:54:01.225Z` (callboard's JSON log time, UTC) as epoch seconds."""
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass
class JobEnd:
    status: str
    error: str
    time: float


@dataclass
class ServerLog:
    """Follows the JSON log of a `callboard server` running at INFO (read incrementally)."""

    server: ServerProcess
    registered: dict[str, float] = field(default_factory=dict)
    """agent_name → server time of its (latest) "worker registered"."""
    ended: dict[tuple[str, str], JobEnd] = field(default_factory=dict)
    """(agent_name, room) → how the job of that dispatch ended."""
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> None:
        try:
            with open(self.server.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            message = rec.get("message")
            if message == "worker registered":
                self.registered[str(rec.get("agent_name"))] = parse_log_time(rec["time"])
            elif message == "job ended":
                key = (str(rec.get("agent_name")), str(rec.get("room")))
                self.ended[key] = JobEnd(
                    str(rec.get("status")), str(rec.get("error", "")), parse_log_time(rec["time"])
                )


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a worker's process tree, summed over its processes, in MB."""

    processes: int
    pss_mb: float
    uss_mb: float
    rss_mb: float


class AgentProcess:
    """`python bench/agents/<side>_agent.py <mode>`: one worker and every process it starts."""

    def __init__(
        self,
        side: str,
        mode: str,
        server: ServerProcess,
        agent_name: str,
        workdir: Path,
        load_threshold: str | None = None,
        zero_load: bool = False,
        num_idle: int | None = None,
        script: str = "agent",
        extra_env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """`script`: bench/agents/<side>_<script>.py (`agent`, or `voice_agent`); `args`: more
        command-line arguments after the mode."""
        if side not in SIDES or mode not in MODES:
            raise ValueError(f"unknown side {side!r} or mode {mode!r}")
        self.side = side
        self.mode = mode
        self.agent_name = agent_name
        self.record_path = workdir / f"{agent_name}.jsonl"
        self.log_path = workdir / f"{agent_name}.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LIVEKIT_", "BENCH_", "CALLBOARD_"))
        }
        env |= {
            "LIVEKIT_URL": server.ws_url,
            "LIVEKIT_API_KEY": DEV_API_KEY,
            "LIVEKIT_API_SECRET": DEV_API_SECRET,
            RECORD_ENV: str(self.record_path),
            AGENT_NAME_ENV: agent_name,
            "PYTHONUNBUFFERED": "1",
        }
        if load_threshold is not None:
            env[LOAD_THRESHOLD_ENV] = load_threshold
        if zero_load:
            env[ZERO_LOAD_ENV] = "1"
        if num_idle is not None:
            env[NUM_IDLE_ENV] = str(num_idle)
        env |= extra_env or {}
        path = AGENTS_DIR / f"{side}_{script}.py"
        with open(self.log_path, "wb") as log_file:
            self.spawned_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, str(path), mode, *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        self._seen: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            self._seen[self.proc.pid] = psutil.Process(self.proc.pid)

    @property
    def label(self) -> str:
        return f"{self.side} {self.mode}"

    def tree(self) -> list[psutil.Process]:
        """The worker and all its descendants now (each also remembered for `stop`)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def memory(self) -> TreeMemory:
        """PSS, USS and RSS summed over the tree (PSS shares each page among its users)."""
        pss = uss = rss = 0
        count = 0
        for p in self.tree():
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += info.pss
            uss += info.uss
            rss += info.rss
            count += 1
        return TreeMemory(count, pss / MB, uss / MB, rss / MB)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the processes of the tree (dead ones keep their last)."""
        for p in self.tree():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            self._cpu[p.pid] = float(t.user + t.system)
        return sum(self._cpu.values())

    def records(self) -> list[dict[str, Any]]:
        """What the entrypoints wrote: one dict per started job."""
        try:
            lines = self.record_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, limit: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            text = ""
        return f"--- {self.label} worker log tail ---\n{text}"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the worker; after `grace` s, SIGKILL whatever is left of its tree."""
        self.tree()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.tree()
        for p in self._seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():  # same PID and start time: still the process we started
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        for p in self._seen.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                p.wait(timeout=1.0)


async def wait_registered(log: ServerLog, worker: AgentProcess, timeout: float) -> float:
    """Seconds from the worker's spawn to the server logging its registration."""
    deadline = time.monotonic() + timeout
    while True:
        log.poll()
        at = log.registered.get(worker.agent_name)
        if at is not None:
            return at - worker.spawned_at
        if worker.exited() is not None:
            raise RuntimeError(f"{worker.label} worker exited early\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker.label} worker did not register\n{worker.log_tail()}")
        await asyncio.sleep(POLL_S)


async def settle(worker: AgentProcess, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until the worker's tree is quiet: same processes, little CPU, for SETTLE_QUIET_S."""
    deadline = time.monotonic() + timeout
    pids = {p.pid for p in worker.tree()}
    since, cpu0 = time.monotonic(), worker.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now_pids = {p.pid for p in worker.tree()}
        if now_pids != pids:
            pids, since, cpu0 = now_pids, time.monotonic(), worker.cpu_seconds()
            continue
        elapsed = time.monotonic() - since
        if elapsed >= SETTLE_QUIET_S:
            used = worker.cpu_seconds() - cpu0
            if used <= SETTLE_CPU_FRACTION * elapsed:
                return
            since, cpu0 = time.monotonic(), worker.cpu_seconds()
    if worker.exited() is not None:
        raise RuntimeError(f"{worker.label} worker exited\n{worker.log_tail()}")
    # Still busy: measure anyway; the machine is shared and may never be quiet.


def room_token(room: str) -> str:
    return (
        api.AccessToken(DEV_API_KEY, DEV_API_SECRET)
        .with_grants(api.VideoGrants(room_admin=True, room_create=True, room=room))
        .to_jwt()
    )


@dataclass
class Dispatch:
    """One CreateDispatch of a run: its room, when it was sent, when its entrypoint started."""

    n: int
    room: str
    metadata: str
    request: bytes
    warm_up: bytes
    """CreateRoom of the dispatch's room, sent first on the same connection (untimed)."""
    sent_at: float = math.nan
    started_at: float = math.nan
    end: JobEnd | None = None
    http_status: int = 0

    @property
    def latency_s(self) -> float:
        return self.started_at - self.sent_at


class Dispatcher:
    """Fires pre-built CreateDispatch requests (one connection each, opened beforehand) at
    the server, all in the same loop iteration, and matches each to its entrypoint record."""

    def __init__(self, server: ServerProcess, log: ServerLog) -> None:
        self._server = server
        self._log = log
        self._runs = 0
        self._conns: list[HttpConnection] = []

    def prepare(
        self, worker: AgentProcess, count: int, hold: float | None, gc: bool = False
    ) -> list[Dispatch]:
        """`count` dispatches to `worker`'s agent, one room each; jobs hold `hold` s (None:
        until terminated), after a full garbage collection if `gc`."""
        self._runs += 1
        out = []
        for n in range(count):
            room = f"{worker.agent_name}-r{self._runs}-{n}"
            metadata = json.dumps({"run": self._runs, "n": n, "hold": hold, "gc": gc})
            body = agent_dispatch.CreateAgentDispatchRequest(
                agent_name=worker.agent_name, room=room, metadata=metadata
            ).SerializeToString()
            headers = {"Authorization": f"Bearer {room_token(room)}", "Content-Type": PROTOBUF}
            raw = http_request(LOOPBACK, self._server.port, DISPATCH_PATH, body, headers)
            warm = room_pb.CreateRoomRequest(name=room).SerializeToString()
            warm_up = http_request(LOOPBACK, self._server.port, CREATE_ROOM_PATH, warm, headers)
            out.append(Dispatch(n, room, metadata, raw, warm_up))
        return out

    async def fire(self, dispatches: Sequence[Dispatch]) -> None:
        """Send every request at once; each one's clock starts just before its write.

        Each connection first creates its room (untimed): the clock covers the dispatch to a
        room that exists (the caller is in it), not the server accepting a connection or
        opening a room. The connections stay open until `wait` returns: closing them at once
        would put the server's connection teardown in the middle of the dispatches measured."""
        conns = [await HttpConnection.open(LOOPBACK, self._server.port) for _ in dispatches]
        self._conns += conns
        for d, c in zip(dispatches, conns, strict=True):
            status, _ = await c.request(d.warm_up)
            if status != 200:
                raise RuntimeError(f"CreateRoom answered HTTP {status}")
        await asyncio.sleep(CONNECTION_SETTLE_S)

        async def one(d: Dispatch, conn: HttpConnection) -> None:
            d.sent_at = time.time()
            d.http_status, _ = await conn.request(d.request)

        try:
            await asyncio.gather(*(one(d, c) for d, c in zip(dispatches, conns, strict=True)))
        except BaseException:
            self._close_connections()
            raise

    def _close_connections(self) -> None:
        for c in self._conns:
            c.close()
        self._conns.clear()

    async def wait(
        self, worker: AgentProcess, dispatches: Sequence[Dispatch], timeout: float
    ) -> None:
        """Until every dispatch's entrypoint started or its job ended without starting."""
        try:
            await self._wait_started(worker, dispatches, timeout)
        finally:
            self._close_connections()

    async def _wait_started(
        self, worker: AgentProcess, dispatches: Sequence[Dispatch], timeout: float
    ) -> None:
        by_meta = {d.metadata: d for d in dispatches}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in worker.records():
                d = by_meta.get(str(rec.get("metadata")))
                if d is not None and math.isnan(d.started_at):
                    d.started_at = float(rec["time"])
            self._log.poll()
            for d in dispatches:
                d.end = self._log.ended.get((worker.agent_name, d.room), d.end)
            if all(not math.isnan(d.started_at) or d.end is not None for d in dispatches):
                return
            if worker.exited() is not None:
                raise RuntimeError(f"{worker.label} worker exited\n{worker.log_tail()}")
            await asyncio.sleep(POLL_S)

    async def wait_ended(
        self, worker: AgentProcess, dispatches: Sequence[Dispatch], timeout: float
    ) -> None:
        """Until the server has logged the end of every dispatch's job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._log.poll()
            if all((worker.agent_name, d.room) in self._log.ended for d in dispatches):
                return
            await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class LatencyStats:
    """Start latencies of a set of dispatches, in ms, and how many started."""

    count: int
    started: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    refused: dict[str, int]

    @classmethod
    def of(cls, dispatches: Sequence[Dispatch]) -> LatencyStats:
        lat = sorted(d.latency_s * 1000 for d in dispatches if not math.isnan(d.started_at))
        refused: dict[str, int] = {}
        for d in dispatches:
            if math.isnan(d.started_at):
                why = d.end.error.split(" (")[0] if d.end is not None else "no answer in time"
                refused[why] = refused.get(why, 0) + 1
        return cls(
            count=len(dispatches),
            started=len(lat),
            p50_ms=percentile(lat, 50),
            p99_ms=percentile(lat, 99),
            max_ms=lat[-1] if lat else math.nan,
            refused=refused,
        )


@dataclass(frozen=True)
class Row:
    """One line of the figures table: a metric, each side's value, and the target ratio."""

    metric: str
    ours: float
    theirs: float
    unit: str
    target: float | None = None
    """Target for ours/theirs (lower is better), if the issue sets one."""
    absolute_target: str = ""
    """A target on our value alone, spelled out (e.g. `p99 <= 100 ms`)."""
    absolute_met: bool | None = None

    @property
    def ratio(self) -> float:
        """ours/theirs; nan for counts, where a ratio says nothing."""
        if self.unit == "count" or self.theirs == 0:
            return math.nan
        if math.isnan(self.theirs) or math.isnan(self.ours):
            return math.nan
        return self.ours / self.theirs

    @property
    def verdict(self) -> str:
        parts = []
        if self.target is not None:
            ok = self.ratio <= self.target
            met = "not measured" if math.isnan(self.ratio) else "met" if ok else "MISSED"
            parts.append(f"ratio <= {self.target:g}: {met}")
        if self.absolute_target:
            met = {None: "not measured", True: "met", False: "MISSED"}[self.absolute_met]
            parts.append(f"{self.absolute_target}: {met}")
        return "; ".join(parts)


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "count":
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: metric | ours | theirs | ours/theirs | target."""
    lines = [
        "| metric | ours | livekit-agents | ours/theirs | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = "-" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        lines.append(
            f"| {r.metric} | {_fmt(r.ours, r.unit)} | {_fmt(r.theirs, r.unit)} | {ratio} "
            f"| {r.verdict} |"
        )
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    ok = sorted(v for v in values if not math.isnan(v))
    if not ok:
        return math.nan
    mid = len(ok) // 2
    return ok[mid] if len(ok) % 2 else (ok[mid - 1] + ok[mid]) / 2


def install_stop(task: asyncio.Task[Any]) -> None:
    """SIGTERM/SIGINT cancel the benchmark, so that its cleanup (stop by PID) still runs."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)


T = TypeVar("T")


def run_bench(name: str, main: Coroutine[Any, Any, T], timeout: float) -> T | None:
    """Run a side-by-side benchmark's coroutine; None (after saying why, in one line) when it
    did not finish in `timeout` seconds or was interrupted."""
    warnings.filterwarnings("ignore", message="The HMAC key is")
    try:
        return asyncio.run(main)
    except TimeoutError:
        print(f"{name}: did not finish within {timeout:g}s", file=sys.stderr)
    except asyncio.CancelledError:
        print(f"{name}: interrupted", file=sys.stderr)
    return None
