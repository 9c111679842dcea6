"""The voice agent, ours vs livekit-agents 1.8.9, on the real livekit-server.

Both sides run examples/receptionist.py (AgentSession, silero VAD, offline Whisper STT, scripted
LLM, hibari TTS), ours as it is, theirs with its one import changed back to livekit-agents'
(bench/agents/<side>_voice_agent.py, the two differing only in their import), each with its
production defaults (`start`) but for the load (reported 0, never refused). WebRTC needs a
non-loopback address, so the benchmark first moves into a private network namespace
(tests/interop/netns.py: root, Linux; nothing leaves the machine) and runs livekit-server there
(built with Go by the interop tests, cached). Each side in turn, on a fresh worker that has run
one untimed job.

**Conversations** (`python -m bench.voice`): callers shaped like LiveKit SIP participants
(callboard.voice_caller.SipCaller: identity `sip_+56975231235`, kind SIP) hear the greeting, say
two sentences (hibari) and hang up; they run in caller processes of their own (one per call
at once, bench/caller_process.py: six rtc SDK callers in the bench process lost their signal
connections), the bench process only orchestrates. Each side is measured the same way:

- turn latency: the caller's end of speech (its last sample leaving the caller's audio queue) to
  the first voiced 10 ms of the agent's answer arriving at the caller, over `--trials`
  sequential calls, p50 and p95;
- tree PSS (the worker and every process it started; never the callers), settled with the
  voice stack idle, and with `--calls` calls in progress (sampled once every caller heard its
  greeting, which may take up to SAMPLE_GREETING_S: the calls say nothing more and hang up
  after the sample); added PSS per call is the difference over `--calls`. The sample prints
  each call's timeline and the CPU of the bench, callers, server and worker meanwhile;
- concurrent conversations held: 1, 2, ... `--max-calls` calls at once, until the p95 of their
  turn latencies exceeds 1.5 s or a call fails (the search stops by itself).

With `--jobs-per-process N` (N > 1) ours is measured a second time the same way, started with
`--jobs-per-process N`: up to N calls share one job process (an opt-in that trades the
process-per-call isolation for memory).

    sudo python -m bench.voice [--trials 3] [--calls 3] [--max-calls 6] [--jobs-per-process 3]
    sudo python -m bench.voice --trials 0 --max-calls 0 --calls 6   # the memory sample alone

**Jobs** (`python -m bench.jobs --voice`): idle tree PSS; dispatch → entrypoint (`time.time()`
just before CreateDispatch to the entrypoint's first act); dispatch → agent joined (a client in
the room sees the agent arrive); added USS per running job (`--memory-jobs` sessions greeting
nobody).

    sudo python -m bench.jobs --voice [--trials 5] [--memory-jobs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
from livekit import api, rtc

from bench._cpu_watch import CpuWatch
from bench._side_by_side import (
    SIDES,
    AgentProcess,
    Row,
    TreeMemory,
    median,
    settle,
    table,
)
from bench.caller_process import CallerProcesses
from callboard.voice_caller import (
    REPLY_TIMEOUT_S,
    hibari_voice,
    percentile,
    sip_caller_token,
    sip_room_name,
)
from tests.interop.livekit_server import API_KEY, API_SECRET, start_server, stop_process
from tests.interop.netns import MEDIA_IP, enter_private_network

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
EXAMPLE: Final = REPO_ROOT / "examples" / "receptionist.py"
OUR_IMPORT: Final = "from callboard import JobContext, JobProcess, WorkerOptions, cli"
THEIR_IMPORT: Final = "from livekit.agents import JobContext, JobProcess, WorkerOptions, cli"
REGISTER_TIMEOUT_S: Final = 120.0
JOIN_TIMEOUT_S: Final = 60.0
END_WAIT_S: Final = 3.0
AGENT_IDENTITY_PREFIX: Final = "agent-"


def ported_example(workdir: Path) -> Path:
    """The receptionist with its one callboard import changed back to livekit-agents'."""
    text = EXAMPLE.read_text()
    if text.count(OUR_IMPORT) != 1:
        raise RuntimeError(f"{EXAMPLE} must import from callboard on exactly one line")
    path = workdir / "receptionist_livekit_agents.py"
    lines = [THEIR_IMPORT if ln.startswith(OUR_IMPORT) else ln for ln in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_registered(worker: AgentProcess) -> None:
    """Until the worker logged its registration (and settled); fails if it exits first."""
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while "registered worker" not in worker.log_path.read_text(errors="replace"):
        if worker.exited() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{worker.label}: no registration\n{worker.log_tail()}")
        await asyncio.sleep(0.1)
    await settle(worker)


@dataclass
class VoiceResult:
    idle: TreeMemory | None = None
    with_jobs: TreeMemory | None = None
    jobs: int = 0
    entry_ms: list[float] = field(default_factory=list)
    joined_ms: list[float] = field(default_factory=list)

    @property
    def added_uss_mb(self) -> float:
        if self.idle is None or self.with_jobs is None or not self.jobs:
            return float("nan")
        return (self.with_jobs.uss_mb - self.idle.uss_mb) / self.jobs


class Watcher:
    """A client in the room before the agent: when did the agent's participant arrive."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.agent_joined = asyncio.get_running_loop().create_future()

        @self.room.on("participant_connected")
        def on_join(p: rtc.RemoteParticipant) -> None:
            if p.identity.startswith(AGENT_IDENTITY_PREFIX) and not self.agent_joined.done():
                self.agent_joined.set_result(time.time())

    async def join(self, server_ws: str, room: str) -> None:
        grants = api.VideoGrants(room_join=True, room=room, can_publish=False)
        token = (
            api.AccessToken(API_KEY, API_SECRET)
            .with_identity(f"watcher-{room}")
            .with_grants(grants)
            .to_jwt()
        )
        await self.room.connect(server_ws, token)


class VoiceBench:
    def __init__(self, server: Any, workdir: Path, trials: int, memory_jobs: int) -> None:
        self.server = server
        self.workdir = workdir
        self.trials = trials
        self.memory_jobs = memory_jobs
        self.examples = {"ours": EXAMPLE, "theirs": ported_example(workdir)}
        self.results: dict[str, VoiceResult] = {}
        self._rooms = 0

    async def run(self, lk: api.LiveKitAPI) -> None:
        for side in SIDES:
            self.results[side] = await self.measure(lk, side)

    async def measure(self, lk: api.LiveKitAPI, side: str) -> VoiceResult:
        out = VoiceResult()
        worker = AgentProcess(
            side,
            "start",
            self.server,
            f"voice-{side}",
            self.workdir,
            script="voice_agent",
            extra_env={"BENCH_EXAMPLE": str(self.examples[side])},
        )
        try:
            await wait_registered(worker)
            await self.one_call(lk, worker)  # untimed: every figure after a first job
            await settle(worker)
            out.idle = worker.memory()
            for _ in range(self.trials):
                entry, joined = await self.one_call(lk, worker)
                out.entry_ms.append(entry * 1000)
                out.joined_ms.append(joined * 1000)
                await settle(worker)
            rooms = [await self.dispatch(lk, worker) for _ in range(self.memory_jobs)]
            for room, _ in rooms:
                await self.wait_entry(worker, room)
            await settle(worker)
            out.with_jobs, out.jobs = worker.memory(), len(rooms)
            for room, _ in rooms:
                await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        finally:
            await asyncio.to_thread(worker.stop)
        return out

    async def dispatch(self, lk: api.LiveKitAPI, worker: AgentProcess) -> tuple[str, float]:
        self._rooms += 1
        room = f"voice-{worker.side}-{self._rooms}"
        await lk.room.create_room(api.CreateRoomRequest(name=room))
        sent = time.time()
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=worker.agent_name, room=room)
        )
        return room, sent

    async def wait_entry(self, worker: AgentProcess, room: str) -> float:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            for rec in worker.records():
                if rec.get("room") == room:
                    return float(rec["time"])
            if worker.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{worker.label}: no job in {room}\n{worker.log_tail()}")
            await asyncio.sleep(0.02)

    async def one_call(self, lk: api.LiveKitAPI, worker: AgentProcess) -> tuple[float, float]:
        """(dispatch → entrypoint, dispatch → agent joined) in seconds, for one new room."""
        self._rooms += 1
        room = f"voice-{worker.side}-{self._rooms}"
        await lk.room.create_room(api.CreateRoomRequest(name=room))
        watcher = Watcher()
        await watcher.join(self.server.ws_url, room)
        try:
            sent = time.time()
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=worker.agent_name, room=room)
            )
            entered = await self.wait_entry(worker, room)
            joined = await asyncio.wait_for(watcher.agent_joined, JOIN_TIMEOUT_S)
        finally:
            await watcher.room.disconnect()
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        await asyncio.sleep(END_WAIT_S)  # the job ends with its room
        return entered - sent, joined - sent

    def rows(self) -> list[Row]:
        o, t = self.results["ours"], self.results["theirs"]
        assert o.idle and t.idle
        return [
            Row("idle tree PSS", o.idle.pss_mb, t.idle.pss_mb, "MB"),
            Row("added USS per running job", o.added_uss_mb, t.added_uss_mb, "MB"),
            Row("dispatch → entrypoint (median)", median(o.entry_ms), median(t.entry_ms), "ms"),
            Row("dispatch → agent joined (median)", median(o.joined_ms), median(t.joined_ms), "ms"),
        ]


async def run_voice(trials: int, memory_jobs: int, json_out: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-voice-"))
    server = await asyncio.to_thread(start_server, "livekit-server", workdir, MEDIA_IP)
    try:
        bench = VoiceBench(server, workdir, trials, memory_jobs)
        async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
            await bench.run(lk)
    finally:
        stop_process(server.proc)
    print(f"voice agent (examples/receptionist.py), {trials} calls per side, real livekit-server")
    print(table(bench.rows()))
    for side, r in bench.results.items():
        idle, busy = r.idle, r.with_jobs
        print(f"{side}: idle {idle}, with {r.jobs} jobs {busy}")
        print(f"  entry ms {[round(x) for x in r.entry_ms]}")
        print(f"  joined ms {[round(x) for x in r.joined_ms]}")
    if json_out:
        print(json.dumps({s: r.__dict__ for s, r in bench.results.items()}, default=str))
    return 0


def main(trials: int, memory_jobs: int, json_out: bool) -> int:
    """Enter the private network namespace, then run (see the module docstring)."""
    with contextlib.suppress(KeyError):
        del os.environ["LIVEKIT_URL"]
    enter_private_network()
    return asyncio.run(run_voice(trials, memory_jobs, json_out))


# -- conversations: `python -m bench.voice` ----------------------------------------------------

CALLER_NUMBER: Final = "+56975231235"
CALLER_SAYS: Final = (
    "Hello, I would like to book an appointment for Monday, please.",
    "What time are you open?",
)
SHARED: Final = "ours-shared"
"""Ours again, with `--jobs-per-process` calls a job process."""
TURN_P95_LIMIT_S: Final = 1.5
"""A concurrency is held while the p95 of its turn latencies stays within this."""
CONVERSATION_TIMEOUT_S: Final = 120.0
SAMPLE_CALLER_NICENESS: Final = 10
"""The callers' niceness during the memory sample, which measures memory, not latency: the
worker under test gets the CPU first, as it would on a machine of its own (six caller
processes at equal priority left one job process holding six calls ~50% of a core)."""
SAMPLE_GREETING_S: Final = 150.0
"""How long a caller of the memory sample may wait for its greeting. The sample measures
memory, not latency, and six calls greeted at once saturate 2 cores (each call's job process
~20% of a core, each caller nearly as much again), so greetings take far longer than a turn's
30 s (livekit-agents' last of six at 79 s on 2026-12-01); each call's timeline is printed."""


@dataclass
class ConversationResult:
    idle: TreeMemory | None = None
    busy: TreeMemory | None = None
    calls: int = 0
    latencies: list[float] = field(default_factory=list)
    capacity: int = 0
    steps: list[tuple[int, float, int]] = field(default_factory=list)
    """(concurrent calls, turn latency p95, failed calls) per step of the capacity search."""

    @property
    def added_pss_mb(self) -> float:
        if self.idle is None or self.busy is None or not self.calls:
            return float("nan")
        return (self.busy.pss_mb - self.idle.pss_mb) / self.calls


def timeline(steps: dict[str, float], origin: float) -> str:
    """A call's steps in seconds from `origin` (monotonic), in order: where a call of the
    memory sample that heard no greeting got stuck."""
    return ", ".join(f"{k} {v - origin:.1f}" for k, v in sorted(steps.items(), key=lambda x: x[1]))


def pss(memory: TreeMemory | None) -> float:
    """PSS in MB, nan when not measured (a call of the sample failed)."""
    return memory.pss_mb if memory is not None else float("nan")


class ConversationBench:
    """Each side in turn: a fresh worker running the receptionist, one untimed conversation,
    idle PSS, `trials` conversations one after another (turn latency), `calls` at once (PSS
    while all of them are in their call), then the capacity search."""

    def __init__(
        self,
        server: Any,
        workdir: Path,
        trials: int,
        calls: int,
        max_calls: int,
        jobs_per_process: int = 1,
    ):
        self.server = server
        self.workdir = workdir
        self.trials = trials
        self.calls = calls
        self.max_calls = max_calls
        self.examples = {"ours": EXAMPLE, "theirs": ported_example(workdir)}
        self.configs: dict[str, tuple[str, tuple[str, ...]]] = {s: (s, ()) for s in SIDES}
        """Each worker measured: its side, and its command-line arguments after `start`."""
        self.jobs_per_process = jobs_per_process
        if jobs_per_process > 1:
            self.configs[SHARED] = ("ours", ("--jobs-per-process", str(jobs_per_process)))
        self.results: dict[str, ConversationResult] = {}
        self.callers = CallerProcesses(max(calls, max_calls), hibari_voice(), CALLER_SAYS, workdir)
        """One caller process per call at once, started once for every side: the callers'
        CPU is theirs, not the bench process's (see bench/caller_process.py)."""

    async def run(self, lk: api.LiveKitAPI) -> None:
        await self.callers.start()
        try:
            for name in self.configs:
                self.results[name] = await self.measure(lk, name)
        finally:
            await self.callers.aclose()

    async def measure(self, lk: api.LiveKitAPI, name: str) -> ConversationResult:
        out = ConversationResult()
        side, args = self.configs[name]
        worker = AgentProcess(
            side,
            "start",
            self.server,
            f"talk-{name}",
            self.workdir,
            script="voice_agent",
            extra_env={"BENCH_EXAMPLE": str(self.examples[side])},
            args=args,
        )
        try:
            await wait_registered(worker)
            await self.conversations(lk, worker, 1)  # untimed
            await settle(worker)
            out.idle = worker.memory()
            for _ in range(self.trials):
                out.latencies += (await self.conversations(lk, worker, 1))[0]
                await settle(worker)
            out.calls = self.calls
            _, out.busy = await self.conversations(lk, worker, self.calls, measure=True)
            await settle(worker)
            for n in range(1, self.max_calls + 1):
                latencies, _ = await self.conversations(lk, worker, n)
                failed = n - len(latencies) // len(CALLER_SAYS)
                p95 = percentile(latencies, 95)
                out.steps.append((n, p95, failed))
                print(f"  {name}: {n} concurrent call(s): turn p95 {p95:.2f} s, {failed} failed")
                if failed or not p95 <= TURN_P95_LIMIT_S:
                    break
                out.capacity = n
                await settle(worker)
        finally:
            await asyncio.to_thread(worker.stop)
        return out

    async def conversations(
        self,
        lk: api.LiveKitAPI,
        worker: AgentProcess,
        n: int,
        measure: bool = False,
        at_sample: Callable[[], object] | None = None,
    ) -> tuple[list[float], TreeMemory | None]:
        """`n` calls at once, each greeting + CALLER_SAYS; the turn latencies of those that
        completed. With `measure`, the calls say nothing: each holds the line after the
        greeting until the tree's memory is sampled, once every caller heard its greeting
        (then they hang up); printed: where each call's time and the machine's CPU went.
        `at_sample` runs at that moment too (bench/shared_process.py reads smaps there)."""
        greeted = [asyncio.Event() for _ in range(n)]
        sampled = asyncio.Event() if measure else None
        start = time.monotonic()
        steps: list[dict[str, float]] = [{} for _ in range(n)]
        memory: list[TreeMemory] = []

        async def sample() -> None:
            for event in greeted:
                await event.wait()
            memory.append(worker.memory())
            if at_sample is not None:
                at_sample()

        watch = CpuWatch(lambda: self.cpu_groups(worker)) if measure else None
        if watch is not None:
            watch.start()
            self.callers.set_nice(SAMPLE_CALLER_NICENESS)
        calls = [
            asyncio.create_task(self.one_call(lk, worker, greeted[i], steps[i], sampled))
            for i in range(n)
        ]
        if sampled is not None:
            sampler = asyncio.create_task(sample())
            # until the sample is taken, or a call failed before its greeting
            await asyncio.wait([sampler, *calls], return_when=asyncio.FIRST_COMPLETED)
            sampler.cancel()
            sampled.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        if watch is not None:
            self.callers.set_nice(0)
        latencies = [x for r in results if isinstance(r, list) for x in r]
        for r in results:
            if isinstance(r, BaseException):
                print(f"  {worker.side}: a call failed: {type(r).__name__}: {r}")
        if watch is not None:
            await watch.stop()
            print(f"  {worker.agent_name}: {n} calls, seconds from the first dial:")
            for i, call_steps in enumerate(steps):
                print(f"    call {i + 1}: {timeline(call_steps, start)}")
            print(f"  CPU while they dialled and were greeted:\n{watch.summary()}")
            path = self.workdir / f"cpu-{worker.agent_name}.txt"
            path.write_text(f"{watch.timeline()}\n{watch.busiest()}\n")
            print(f"  (second by second, and the busiest processes: {path})")
        return latencies, (memory[0] if memory else None)

    def cpu_groups(self, worker: AgentProcess) -> dict[str, list[psutil.Process]]:
        """The processes of a conversation: this one, the callers, the server, the worker."""
        return {
            "bench": [psutil.Process()],
            "callers": self.callers.processes(),
            "server": [psutil.Process(self.server.proc.pid)],
            "worker": worker.tree(),
        }

    async def one_call(
        self,
        lk: api.LiveKitAPI,
        worker: AgentProcess,
        greeted: asyncio.Event,
        steps: dict[str, float] | None = None,
        hold: asyncio.Event | None = None,
    ) -> list[float]:
        """One conversation, its caller in a caller process; its turn latencies. `steps` gets
        when the call reached each step (monotonic s), whether it succeeded or not. With
        `hold`, the caller says nothing: it hears the greeting (within SAMPLE_GREETING_S),
        holds the line until `hold` is set, and hangs up."""
        room = sip_room_name(CALLER_NUMBER)
        await lk.room.create_room(api.CreateRoomRequest(name=room, departure_timeout=1))
        token = sip_caller_token(API_KEY, API_SECRET, room, CALLER_NUMBER)
        call = self.callers.dial(self.server.ws_url, token, () if hold else CALLER_SAYS)
        try:
            async with asyncio.timeout(CONVERSATION_TIMEOUT_S + (SAMPLE_GREETING_S if hold else 0)):
                await call.step("dialled")
                await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name=worker.agent_name, room=room)
                )
                call.mark("dispatched")
                call.listen(SAMPLE_GREETING_S if hold else REPLY_TIMEOUT_S)
                await call.step("greeted")
                greeted.set()
                if hold is not None:
                    await hold.wait()
                    latencies: list[float] = []
                else:
                    latencies = await call.ended()
        finally:
            await call.hang_up()
            if steps is not None:
                steps.update(call.steps)
        await asyncio.sleep(END_WAIT_S)  # the job ends with the call
        return latencies

    def rows(self) -> list[Row]:
        o, t = self.results["ours"], self.results["theirs"]
        p50_ours = percentile(o.latencies, 50)
        return [
            Row(
                "turn latency p50",
                p50_ours * 1000,
                percentile(t.latencies, 50) * 1000,
                "ms",
                absolute_target="p50 <= 1200 ms",
                absolute_met=None if math.isnan(p50_ours) else p50_ours <= 1.2,
            ),
            Row(
                "turn latency p95",
                percentile(o.latencies, 95) * 1000,
                percentile(t.latencies, 95) * 1000,
                "ms",
            ),
            Row("tree PSS, voice stack idle", pss(o.idle), pss(t.idle), "MB"),
            Row(f"tree PSS, {self.calls} calls", pss(o.busy), pss(t.busy), "MB"),
            Row("added PSS per call", o.added_pss_mb, t.added_pss_mb, "MB", target=0.25),
            *self.capacity_rows("", o, t),
            *self.shared_rows(),
        ]

    def shared_rows(self) -> list[Row]:
        """Ours again with several calls a process (`--jobs-per-process`), against theirs."""
        sh, t = self.results.get(SHARED), self.results["theirs"]
        if sh is None:
            return []
        n = f"ours with {self.jobs_per_process} calls a process"
        return [
            Row(
                f"turn latency p50, {n}",
                percentile(sh.latencies, 50) * 1000,
                percentile(t.latencies, 50) * 1000,
                "ms",
            ),
            Row(f"tree PSS, voice stack idle, {n}", pss(sh.idle), pss(t.idle), "MB"),
            Row(f"added PSS per call, {n}", sh.added_pss_mb, t.added_pss_mb, "MB", target=0.25),
            *self.capacity_rows(f", {n}", sh, t),
        ]

    def capacity_rows(self, what: str, o: ConversationResult, t: ConversationResult) -> list[Row]:
        """Concurrent calls held, when the search ran (`--max-calls` > 0)."""
        if not self.max_calls:
            return []
        limit = f"turn p95 <= {TURN_P95_LIMIT_S} s"
        return [Row(f"concurrent calls held ({limit}){what}", o.capacity, t.capacity, "count")]


async def run_conversations(
    trials: int, calls: int, max_calls: int, jobs_per_process: int, json_out: bool
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-talk-"))
    server = await asyncio.to_thread(start_server, "livekit-server", workdir, MEDIA_IP)
    try:
        bench = ConversationBench(server, workdir, trials, calls, max_calls, jobs_per_process)
        async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
            await bench.run(lk)
    finally:
        stop_process(server.proc)
    print(
        f"\nconversations with examples/receptionist.py on the real livekit-server: {trials} "
        f"sequential calls of {len(CALLER_SAYS)} turns per side, then {calls} at once, then "
        f"1..{max_calls} at once until turn p95 > {TURN_P95_LIMIT_S} s"
    )
    print(table(bench.rows()))
    for side, r in bench.results.items():
        print(f"{side}: idle {r.idle}, with {r.calls} calls {r.busy}")
        print(f"  turn latencies s {[round(x, 2) for x in r.latencies]}")
        print(f"  capacity steps (calls, p95 s, failed) {r.steps}")
    if json_out:
        print(json.dumps({s: r.__dict__ for s, r in bench.results.items()}, default=str))
    return 0


def conversations_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.voice", description=__doc__)
    p.add_argument("--trials", type=int, default=3, help="sequential calls per side (3; 0: none)")
    p.add_argument("--calls", type=int, default=3, help="calls at once for memory (3)")
    p.add_argument(
        "--max-calls", type=int, default=6, help="capacity search bound (6; 0: no search)"
    )
    p.add_argument(
        "--jobs-per-process",
        type=int,
        default=1,
        help="also measure ours with this many calls a job process (1: not measured)",
    )
    p.add_argument("--timeout", type=float, default=2400.0, help="overall limit, s (2400)")
    p.add_argument("--json", action="store_true", help="also print every measure as JSON")
    a = p.parse_args(argv)
    if min(a.calls, a.jobs_per_process) < 1 or min(a.trials, a.max_calls) < 0:
        p.error("--calls and --jobs-per-process must be at least 1, --trials and --max-calls 0+")
    with contextlib.suppress(KeyError):
        del os.environ["LIVEKIT_URL"]
    enter_private_network()
    main_task = run_conversations(a.trials, a.calls, a.max_calls, a.jobs_per_process, a.json)
    return asyncio.run(asyncio.wait_for(main_task, a.timeout))


if __name__ == "__main__":
    sys.exit(conversations_main())
