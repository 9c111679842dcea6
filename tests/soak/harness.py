"""The soak: `callboard server` and two real workers (PROCESS executor) as subprocesses, N jobs
spread over time with injected faults, then the accounting of every job, the leak checks and
the memory trend. `run_soak(plan, workdir)` returns a `SoakReport`; tests/soak/test_soak.py
asserts on it and scripts/reliability_report.py prints it.

Faults, each counted exactly:

- per job, from its dispatch metadata (see soak_agent.py): the entrypoint raises; the job
  process is SIGKILLed (its pid found through the worker's GET /worker); the job blocks its event
  loop (killed as unresponsive); the job eats memory (killed at job_memory_limit_mb);
- per run, at planned points: worker A's connection is cut (a TCP relay between worker A and the
  server drops every connection; A reconnects and migrates its jobs); worker B is SIGKILLed and a
  new worker B started; the server is stopped (SIGTERM, or SIGKILL for a crash) and a new one
  started on the same port; the workers reconnect by themselves.

Before a server restart the harness stops creating dispatches and waits until every job of the
dying server is either ended or running on a worker (a dispatch still being placed when an
in-memory server dies dies with it; that is the server's documented limit, not a fault under
test). Everything listens on 127.0.0.1; every process is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
from livekit import api
from livekit.protocol import agent_dispatch, models, room

from tests.server.token_attacks import TARGET_ROOM, Keys, run_table
from tests.soak import soak_agent
from tests.soak.accounting import (
    TERMINAL,
    Accounting,
    DispatchRecord,
    account,
    growth,
    registered_ids,
    worker_ends,
)
from tests.subprocs import (
    AgentProcess,
    ServerProcess,
    TreeWatch,
    Twirp,
    TwirpCallError,
    fd_count,
    free_port,
    json_lines,
    memory,
    non_json_lines,
)

log = logging.getLogger("tests.soak")

AGENT_SCRIPT: Final = Path(soak_agent.__file__)
AGENT_NAME: Final = "soak"
KEY: Final = "soakkey"
OTHER_KEY: Final = "soakkey2"
ROOM_EMPTY_TIMEOUT_S: Final = 6 * 3600
"""Rooms outlive the run, so their records stay listed until the end."""
POLL_S: Final = 0.5
FIND_PID_POLL_S: Final = 0.05
SAMPLE_S: Final = 0.5
QUIESCE_TIMEOUT_S: Final = 45.0
"""Covers the server's 15 s migration grace for the jobs of a SIGKILLed worker."""
FINISH_TIMEOUT_S: Final = 90.0
IDLE_TIMEOUT_S: Final = 30.0
EXIT_TIMEOUT_S: Final = 60.0
LEAK_GRACE_S: Final = 10.0
WARM_UP_JOBS: Final = 6
LEAD_IN_JOBS: Final = 4
LEAD_IN_SECONDS: Final = 7.0
WORKER_DOWN_S: Final = 4.0
"""How long the flow goes on with worker B dead before a new B starts."""
MEMORY_GROWTH_LIMIT: Final = 0.10
EXPECTED_ERRORS: Final = frozenset(
    {
        "entrypoint raised an exception, the job failed",
        "job process stacks before kill",
        "job process over its memory limit",
    }
)
"""ERROR lines the injected faults must produce; any other ERROR line is a defect."""
EVENT_CYCLE: Final = ("kill_worker", "cut", "restart_server", "cut", "crash_server")
"""A server restart first waits out the killed worker's jobs (the server's migration grace):
the kill comes two events before it, so that little of the grace is left by then."""


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    seq: int
    fault: str
    seconds: float
    room: str

    @property
    def metadata(self) -> str:
        return json.dumps({"fault": self.fault, "seq": self.seq, "seconds": self.seconds})


@dataclass(frozen=True)
class SoakPlan:
    """N jobs at `rate` per second, each with a fault drawn from `mix` (the rest run
    normally), and `events` run-level faults spread evenly over the run."""

    jobs: int
    rate: float = 3.0
    seed: int = 6
    mix: tuple[tuple[str, float], ...] = (
        ("raise", 0.08),
        ("sigkill", 0.05),
        ("hang", 0.04),
        ("hog", 0.04),
    )
    events: int = 5

    @classmethod
    def sized(cls, jobs: int) -> SoakPlan:
        """The CI form: 5 events up to 200 jobs, one more event per 100 jobs beyond."""
        return cls(jobs=jobs, events=max(5, jobs // 100 + 3))

    def schedule(self) -> list[JobSpec]:
        """The jobs in dispatch order. The few just before each run-level fault are plain long
        calls, so that every fault meets running jobs."""
        rng = random.Random(self.seed)
        events = self.event_at()
        lead_in = {i - k for i in events for k in range(1, LEAD_IN_JOBS + 1)}
        out = []
        for seq in range(self.jobs):
            fault = "none"
            if seq in lead_in:
                out.append(JobSpec(seq, fault, LEAD_IN_SECONDS, room_name(seq, rng)))
                continue
            if seq >= WARM_UP_JOBS:
                draw = rng.random()
                for kind, share in self.mix:
                    if draw < share:
                        fault = kind
                        break
                    draw -= share
            seconds = round(rng.uniform(0.2, 2.5), 2)
            if fault == "none" and rng.random() < 0.08:
                long_call = round(rng.uniform(4.0, 9.0), 2)  # across the events
                # the warm-up is waited out before the flow starts: a long call there only idles
                seconds = long_call if seq >= WARM_UP_JOBS else seconds
            out.append(JobSpec(seq, fault, seconds, room_name(seq, rng)))
        return out

    def event_at(self) -> dict[int, str]:
        """Job index → run-level fault injected just before that job is dispatched."""
        span = self.jobs - WARM_UP_JOBS
        return {
            WARM_UP_JOBS + (i + 1) * span // (self.events + 1): EVENT_CYCLE[i % len(EVENT_CYCLE)]
            for i in range(self.events)
        }


def room_name(seq: int, rng: random.Random) -> str:
    """Mostly plain names; some unicode and some near the 256-character limit."""
    draw = rng.random()
    if draw < 0.1:
        return f"llamada-{seq:05d}-ñandú-☎-通話"
    if draw < 0.15:
        return f"long-{seq:05d}-" + "x" * 230
    return f"soak-{seq:05d}"


# -- a relay whose connections can be cut ------------------------------------------------------


class CutRelay:
    """A TCP relay from a local port to the server; `cut()` aborts every relayed connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    def cut(self) -> int:
        """Abort every relayed connection (both sides, no close frames); how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            for w in pair:
                w.transport.abort()
        return len(pairs)

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


# -- the report --------------------------------------------------------------------------------


@dataclass
class WorkerFigures:
    label: str
    exit_code: int | None = None
    killed: bool = False
    fds_baseline: int = 0
    fds_final: int = 0
    rss_growth: float = 0.0
    uss_growth: float = 0.0
    rss_mb_end: float = 0.0


@dataclass
class SoakReport:
    plan: SoakPlan
    wall_s: float = 0.0
    dispatched: int = 0
    dispatch_errors: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    """Faults injected, each counted when it reached its target."""
    accounting: Accounting = field(default_factory=Accounting)
    workers: list[WorkerFigures] = field(default_factory=list)
    leaked_processes: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    unexpected_log_lines: list[str] = field(default_factory=list)
    attacks_refused: int = 0
    migrated: int = 0
    """Jobs the server re-attached to a reconnected worker (MigrateJobRequest after a cut)."""
    attack_problems: list[str] = field(default_factory=list)
    issued_tokens: list[str] = field(default_factory=list)
    secret: str = ""
    other_secret: str = ""
    log_files: list[Path] = field(default_factory=list)
    server_rss_mb: list[float] = field(default_factory=list)

    @property
    def descriptors_leaked(self) -> int:
        return sum(max(0, w.fds_final - w.fds_baseline) for w in self.workers if not w.killed)

    def summary(self) -> dict[str, Any]:
        acc = self.accounting
        return {
            "jobs_planned": self.plan.jobs,
            "dispatched": self.dispatched,
            "dispatch_errors": len(self.dispatch_errors),
            "faults": dict(sorted(self.faults.items())),
            "accounted_by_server": acc.by_server,
            "accounted_by_worker_log": acc.by_worker_log,
            "failed_with_their_killed_worker": acc.worker_gone,
            "migrated_after_a_cut": self.migrated,
            "lost": len(acc.lost),
            "duplicates": len(acc.duplicates),
            "disagreements": len(acc.disagreements),
            "unexpected_outcomes": len(acc.unexpected),
            "outcomes": dict(sorted(acc.outcomes.items())),
            "processes_leaked": len(self.leaked_processes),
            "descriptors_leaked": self.descriptors_leaked,
            "crashes": len(self.crashes),
            "unexpected_log_lines": len(self.unexpected_log_lines),
            "attacks_refused": self.attacks_refused,
            "workers": [w.__dict__ for w in self.workers],
            "server_rss_mb": self.server_rss_mb,
            "wall_s": round(self.wall_s, 1),
        }


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Tracked:
    spec: JobSpec
    record: DispatchRecord
    token: str

    @property
    def terminal(self) -> bool:
        jobs = self.record.jobs
        return bool(jobs) and all(j.state.status in TERMINAL for j in jobs)


@dataclass
class WorkerSlot:
    """One worker role (A behind the relay, B direct); `instances` are its processes in order."""

    label: str
    ws_url: str
    instances: list[AgentProcess] = field(default_factory=list)
    figures: list[WorkerFigures] = field(default_factory=list)

    @property
    def current(self) -> AgentProcess:
        return self.instances[-1]

    @property
    def current_figures(self) -> WorkerFigures:
        return self.figures[-1]


class Soak:
    def __init__(self, plan: SoakPlan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.secret = f"soak-secret-{secrets.token_hex(32)}"
        self.keys = Keys(
            KEY, self.secret, OTHER_KEY, f"soak-other-{secrets.token_hex(32)}", "wrong" * 16
        )
        self.report = SoakReport(plan, secret=self.secret, other_secret=self.keys.other_secret)
        self.ledger = workdir / "ledger.jsonl"
        self.port = free_port()
        self.epoch = 0
        self.servers: list[ServerProcess] = []
        self.tracked: list[Tracked] = []
        self.tree = TreeWatch()
        self.samples: dict[str, list[tuple[float, int, int]]] = {}
        self.killed_pids: set[int] = set()
        self.t_start = 0.0
        self.t_end = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.dispatching: set[asyncio.Task[Any]] = set()
        """CreateRoom calls in flight."""
        self.relay = CutRelay(self.port)
        self.slots: list[WorkerSlot] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._http: aiohttp.ClientSession | None = None
        self._worker_http: aiohttp.ClientSession | None = None

    # -- helpers ---------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def worker_http(self) -> aiohttp.ClientSession:
        assert self._worker_http is not None
        return self._worker_http

    @property
    def server(self) -> ServerProcess:
        return self.servers[-1]

    @property
    def twirp(self) -> Twirp:
        return Twirp(self.http, self.server.http_url)

    def token(self, room_name: str) -> str:
        token = (
            api.AccessToken(KEY, self.secret)
            .with_grants(
                api.VideoGrants(room_create=True, room_admin=True, room_list=True, room=room_name)
            )
            .to_jwt()
        )
        self.report.issued_tokens.append(token)
        return token

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- processes -------------------------------------------------------------------------

    async def start_server(self) -> None:
        self.epoch += 1
        server = ServerProcess(
            self.port,
            {KEY: self.secret, OTHER_KEY: self.keys.other_secret},
            self.workdir / f"server-{self.epoch}.log",
        )
        self.servers.append(server)
        self.report.log_files.append(server.log_path)
        await server.start(self.http)

    async def start_worker(self, slot: WorkerSlot) -> None:
        n = len(slot.instances) + 1
        label = f"{slot.label}{n}"
        proc = AgentProcess(
            AGENT_SCRIPT,
            {
                "LIVEKIT_URL": slot.ws_url,
                "LIVEKIT_API_KEY": KEY,
                "LIVEKIT_API_SECRET": self.secret,
                "LIVEKIT_AGENT_NAME": AGENT_NAME,
                soak_agent.LEDGER_ENV: str(self.ledger),
                soak_agent.WORKER_LABEL_ENV: label,
            },
            free_port(),
            self.workdir / f"worker-{label}.log",
            soak_agent.HTTP_PORT_ENV,
        )
        await proc.spawn()
        slot.instances.append(proc)
        slot.figures.append(WorkerFigures(label))
        self.report.log_files.append(proc.log_path)
        await proc.wait_registered(self.worker_http)

    async def start_all(self) -> None:
        await self.start_server()
        await self.relay.start()
        self.slots = [
            WorkerSlot("A", f"ws://127.0.0.1:{self.relay.port}"),
            WorkerSlot("B", self.server.url),
        ]
        await asyncio.gather(*(self.start_worker(s) for s in self.slots))

    async def wait_idle(self, proc: AgentProcess) -> None:
        """Until the worker runs no job and its warm pool is full (idle processes + zygote)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_TIMEOUT_S
        idle_key = 'callboard_processes{state="idle"}'
        total_key = 'callboard_processes{state="total"}'
        stable = 0
        while stable < 3:
            m = await proc.metrics(self.worker_http)
            ok = (
                m.get("callboard_active_jobs") == 0
                and m.get(idle_key) == soak_agent.IDLE_PROCESSES
                and m.get(total_key) == soak_agent.IDLE_PROCESSES + 1
            )
            stable = stable + 1 if ok else 0
            if loop.time() > deadline:
                raise AssertionError(f"worker {proc.log_path.name} did not go idle: {m}")
            await asyncio.sleep(0.2)

    async def measure_fds(self, slot: WorkerSlot, baseline: bool) -> None:
        proc = slot.current
        await self.wait_idle(proc)
        count = fd_count(proc.pid)
        if baseline:
            slot.current_figures.fds_baseline = count
        else:
            slot.current_figures.fds_final = count

    def note_server_memory(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.report.server_rss_mb.append(round(memory(self.server.pid)[0] / 2**20, 1))

    # -- background tasks ------------------------------------------------------------------

    async def sample_task(self) -> None:
        """Memory of every worker main process, the process trees, server liveness."""
        while True:
            now = time.monotonic()
            for slot in self.slots:
                for proc, figures in zip(slot.instances, slot.figures, strict=True):
                    if not proc.running:
                        continue
                    self.tree.sample(proc.pid)
                    with contextlib.suppress(psutil.Error):
                        rss, uss = memory(proc.pid)
                        self.samples.setdefault(figures.label, []).append((now, rss, uss))
            if not self._stopping and not self.server.running:
                self.report.crashes.append(
                    f"callboard server (epoch {self.epoch}) exited by itself with "
                    f"{self.server.proc.returncode if self.server.proc else None}"
                )
                self._stopping = True
            await asyncio.sleep(SAMPLE_S)

    async def poll_task(self) -> None:
        """ListDispatch for every job of the current epoch that has not ended yet."""
        sem = asyncio.Semaphore(8)

        async def refresh(t: Tracked) -> None:
            async with sem:
                await self.refresh(t)

        while True:
            pending = [t for t in self.tracked if t.record.epoch == self.epoch and not t.terminal]
            await asyncio.gather(*(refresh(t) for t in pending))
            await asyncio.sleep(POLL_S)

    async def refresh(self, t: Tracked) -> None:
        if t.record.epoch != self.epoch or t.record.epoch_ended:
            return
        with contextlib.suppress(aiohttp.ClientError, OSError, TwirpCallError):
            listed = await self.twirp.call(
                "livekit.AgentDispatchService/ListDispatch",
                agent_dispatch.ListAgentDispatchRequest(room=t.spec.room),
                agent_dispatch.ListAgentDispatchResponse,
                t.token,
            )
            if t.record.epoch != self.epoch or t.record.epoch_ended:
                return
            t.record.dispatches = len(listed.agent_dispatches)
            t.record.jobs = [j for d in listed.agent_dispatches for j in d.state.jobs]

    # -- dispatching -----------------------------------------------------------------------

    async def dispatch(self, spec: JobSpec) -> None:
        token = self.token(spec.room)
        req = room.CreateRoomRequest(
            name=spec.room,
            empty_timeout=ROOM_EMPTY_TIMEOUT_S,
            agents=[
                agent_dispatch.RoomAgentDispatch(agent_name=AGENT_NAME, metadata=spec.metadata)
            ],
        )
        epoch = self.epoch
        try:
            await self.twirp.call("livekit.RoomService/CreateRoom", req, models.Room, token)
        except (aiohttp.ClientError, OSError, TwirpCallError) as e:
            self.report.dispatch_errors.append(f"job #{spec.seq}: {e!r}")
            return
        self.report.dispatched += 1
        record = DispatchRecord(spec.seq, spec.fault, spec.room, epoch)
        tracked = Tracked(spec, record, token)
        self.tracked.append(tracked)
        if spec.fault == "sigkill":
            self.spawn(self.sigkill_job(tracked), f"sigkill-{spec.seq}")

    async def sigkill_job(self, t: Tracked) -> None:
        """Find the job's process through GET /worker and SIGKILL it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        while loop.time() < deadline and not t.terminal:
            for slot in self.slots:
                proc = slot.current
                info = await proc.info(self.worker_http)
                for job in (info or {}).get("jobs", []):
                    if job["room"] == t.spec.room and job["pid"]:
                        if self.kill_job_process(proc, int(job["pid"])):
                            self.report.faults["sigkill"] += 1
                        return
            await asyncio.sleep(FIND_PID_POLL_S)

    def kill_job_process(self, worker: AgentProcess, pid: int) -> bool:
        """SIGKILL `pid` if, and only if, it is a process of `worker`'s tree."""
        try:
            tree = {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
        except psutil.Error:
            return False
        if pid not in tree or pid in self.killed_pids:
            return False
        self.killed_pids.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return True
        return False

    # -- run-level faults ------------------------------------------------------------------

    async def cut(self) -> None:
        """Abort worker A's connection; A reconnects (new worker id) and migrates its jobs."""
        worker = self.slots[0].current
        before = str((await worker.info(self.worker_http) or {}).get("id"))
        if self.relay.cut():
            self.report.faults["connection_cut"] += 1
        await worker.wait_registered(self.worker_http, before)

    async def kill_worker(self) -> None:
        """SIGKILL worker B; jobs keep flowing (to A) for a while, then a new B starts (the
        flow pauses while it registers, so that its idle descriptor count can be taken)."""
        slot = self.slots[1]
        proc = slot.current
        slot.current_figures.killed = True
        self.tree.sample(proc.pid)
        code = await proc.stop(signal.SIGKILL)
        slot.current_figures.exit_code = code
        self.report.faults["worker_sigkill"] += 1
        await asyncio.sleep(WORKER_DOWN_S)
        self.flowing.clear()
        try:
            await self.start_worker(slot)
            await self.measure_fds(slot, baseline=True)
        finally:
            self.flowing.set()

    async def restart_server(self, crash: bool) -> None:
        self.flowing.clear()
        try:
            await self._restart_server(crash)
        finally:
            self.flowing.set()

    async def _restart_server(self, crash: bool) -> None:
        # CreateRoom calls still in flight belong to this epoch: have them answered first.
        await asyncio.gather(*self.dispatching, return_exceptions=True)
        await self.quiesce()
        pending = [t for t in self.tracked if t.record.epoch == self.epoch and not t.terminal]
        await asyncio.gather(*(self.refresh(t) for t in pending))
        ids = {}
        for slot in self.slots:
            ids[slot.label] = str((await slot.current.info(self.worker_http) or {}).get("id"))
        for t in self.tracked:
            if t.record.epoch == self.epoch and not t.terminal:
                t.record.epoch_ended = True
        self._stopping = True
        self.note_server_memory()
        code = await self.server.stop(signal.SIGKILL if crash else signal.SIGTERM)
        if not crash and code != 0:
            self.report.crashes.append(f"callboard server exited {code} on SIGTERM")
        self.report.faults["server_crash" if crash else "server_restart"] += 1
        await self.start_server()
        self._stopping = False
        await asyncio.gather(
            *(s.current.wait_registered(self.worker_http, ids[s.label]) for s in self.slots)
        )

    async def quiesce(self) -> None:
        """Until every job of this epoch has ended or runs on a worker (none being placed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUIESCE_TIMEOUT_S
        while loop.time() < deadline:
            rooms: set[str] = set()
            for slot in self.slots:
                info = await slot.current.info(self.worker_http)
                rooms.update(j["room"] for j in (info or {}).get("jobs", []))
            pending = [
                t
                for t in self.tracked
                if t.record.epoch == self.epoch and not t.terminal and t.spec.room not in rooms
            ]
            if not pending:
                return
            await asyncio.gather(*(self.refresh(t) for t in pending))
            await asyncio.sleep(0.1)
        log.warning("quiesce timed out; the accounting will show what was lost")

    async def attack(self) -> None:
        """The token-attack table against the server process (counted as refused or not)."""
        table = await run_table(
            self.http, self.server.http_url, self.keys, [self.secret, self.keys.other_secret]
        )
        self.report.attacks_refused += table.refused
        self.report.attack_problems += table.problems
        self.report.issued_tokens += table.tokens
        listed = await self.twirp.call(
            "livekit.RoomService/ListRooms",
            room.ListRoomsRequest(names=[TARGET_ROOM]),
            room.ListRoomsResponse,
            self.token(TARGET_ROOM),
        )
        if listed.rooms:
            self.report.attack_problems.append("an attack created the target room")

    # -- the phases ------------------------------------------------------------------------

    async def dispatch_all(self) -> None:
        """Warm up, then dispatch the plan at its rate; run-level faults run beside the flow
        (one at a time), pausing it only while they need to (a server restart)."""
        schedule = self.plan.schedule()
        events = self.plan.event_at()
        attack_at = self.plan.jobs // 2
        handlers: dict[str, Callable[[], Awaitable[None]]] = {
            "cut": self.cut,
            "kill_worker": self.kill_worker,
            "restart_server": lambda: self.restart_server(crash=False),
            "crash_server": lambda: self.restart_server(crash=True),
        }
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(self.dispatch(s) for s in schedule[:WARM_UP_JOBS]))
        await self.wait_ended(lambda t: True, FINISH_TIMEOUT_S)
        for slot in self.slots:
            await self.measure_fds(slot, baseline=True)
        self.t_start = time.monotonic()
        next_at = loop.time()
        event_task: asyncio.Task[Any] | None = None
        for spec in schedule[WARM_UP_JOBS:]:
            event = events.get(spec.seq)
            if event is not None:
                if event_task is not None:
                    await event_task
                event_task = self.spawn(handlers[event](), f"event-{event}")
                await asyncio.sleep(0)  # let it pause the flow before the next dispatch
            if spec.seq == attack_at:
                await self.attack()
            next_at += 1.0 / self.plan.rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if not self.flowing.is_set():
                paused = loop.time()
                await self.flowing.wait()
                next_at += loop.time() - paused
            task = self.spawn(self.dispatch(spec), f"dispatch-{spec.seq}")
            self.dispatching.add(task)
            task.add_done_callback(self.dispatching.discard)
        if event_task is not None:
            await event_task
        await asyncio.gather(*self.dispatching)

    async def wait_ended(self, which: Callable[[Tracked], bool], timeout: float) -> None:
        """Until the selected jobs have ended: in the server's records (current epoch), or on
        the workers (jobs of an ended epoch: no worker still runs anything)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            open_now = [
                t
                for t in self.tracked
                if which(t) and t.record.epoch == self.epoch and not t.terminal
            ]
            busy = False
            for slot in self.slots:
                info = await slot.current.info(self.worker_http)
                busy = busy or bool((info or {}).get("jobs"))
            if not open_now and not busy:
                return
            await asyncio.gather(*(self.refresh(t) for t in open_now))
            await asyncio.sleep(POLL_S)

    async def finish(self) -> None:
        await self.wait_ended(lambda t: True, FINISH_TIMEOUT_S)
        self.t_end = time.monotonic()
        for slot in self.slots:
            await self.measure_fds(slot, baseline=False)
        self._stopping = True
        for slot in self.slots:
            self.tree.sample(slot.current.pid)
        codes = await asyncio.gather(
            *(s.current.stop(signal.SIGTERM, EXIT_TIMEOUT_S) for s in self.slots)
        )
        for slot, code in zip(self.slots, codes, strict=True):
            slot.current_figures.exit_code = code
            if code != 0:
                self.report.crashes.append(f"worker {slot.current_figures.label} exited {code}")
        self.report.leaked_processes = await self.tree.wait_all_gone(LEAK_GRACE_S)
        self.note_server_memory()
        server_code = await self.server.stop(signal.SIGTERM)
        if server_code != 0:
            self.report.crashes.append(f"callboard server exited {server_code} on SIGTERM")

    async def run(self) -> SoakReport:
        started = time.monotonic()
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession() as self._http,
            aiohttp.ClientSession(connector=connector) as self._worker_http,
        ):
            try:
                await self.start_all()
                sampler = self.spawn(self.sample_task(), "sampler")
                poller = self.spawn(self.poll_task(), "poller")
                await self.dispatch_all()
                await self.finish()
                sampler.cancel()
                poller.cancel()
            finally:
                await self.cleanup()
        self.report.wall_s = time.monotonic() - started
        self.analyse()
        return self.report

    async def cleanup(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.relay.aclose()
        for slot in self.slots:
            for proc in slot.instances:
                if proc.proc is not None and proc.running:
                    await proc.stop(signal.SIGKILL, 5.0)
        for server in self.servers:
            if server.proc is not None and server.running:
                await server.stop(signal.SIGKILL, 5.0)

    # -- after the run ---------------------------------------------------------------------

    def analyse(self) -> None:
        ends = []
        killed_ids: set[str] = set()
        for slot in self.slots:
            for proc, figures in zip(slot.instances, slot.figures, strict=True):
                lines = list(json_lines(proc.log_path))
                ends += worker_ends(figures.label, lines)
                if figures.killed:
                    killed_ids |= registered_ids(lines)
                self.report.workers.append(figures)
                self.check_log(proc.log_path, lines)
        for server in self.servers:
            lines = list(json_lines(server.log_path))
            self.check_log(server.log_path, lines)
            self.report.migrated += sum(1 for rec in lines if rec.get("message") == "job migrated")
        starts: Counter[str] = Counter()
        for line in json_lines(self.ledger):
            if line.get("event") == "start":
                starts[str(line["job_id"])] += 1
                if line["fault"] in ("raise", "hang", "hog"):
                    self.report.faults[str(line["fault"])] += 1
        self.report.accounting = account([t.record for t in self.tracked], ends, starts, killed_ids)
        self.memory_trend()

    def check_log(self, path: Path, lines: list[dict[str, Any]]) -> None:
        for rec in lines:
            if rec.get("level") in ("ERROR", "CRITICAL") and rec.get("message") not in (
                EXPECTED_ERRORS
            ):
                self.report.unexpected_log_lines.append(f"{path.name}: {json.dumps(rec)[:400]}")
        for line in non_json_lines(path):
            self.report.unexpected_log_lines.append(f"{path.name}: {line[:400]}")

    def memory_trend(self) -> None:
        """Growth of each surviving worker's memory over the second half of the run."""
        mid = self.t_start + (self.t_end - self.t_start) / 2
        for figures in self.report.workers:
            samples = self.samples.get(figures.label, [])
            if figures.killed or not samples:
                continue
            figures.rss_growth = growth([(t, r) for t, r, _ in samples], mid, self.t_end)
            figures.uss_growth = growth([(t, u) for t, _, u in samples], mid, self.t_end)
            figures.rss_mb_end = round(samples[-1][1] / 2**20, 1)


async def run_soak(plan: SoakPlan, workdir: Path) -> SoakReport:
    """Run `plan` with its processes and logs in `workdir` (which must exist)."""
    return await Soak(plan, workdir).run()
