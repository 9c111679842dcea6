"""Admission of voice calls with default options: bursts above a worker's capacity.

One callboard worker runs examples/receptionist.py with its production defaults (`start`, the
default `load_threshold`, CPU load reported, learned job cost) against the real livekit-server
in a private network namespace (tests/interop/netns.py). Callers are
`callboard.voice_caller.SipCaller` (LiveKit SIP participants), as in bench/voice.py.

1. **Learn**: `--learn-calls` conversations at once, so that the worker measures what a call
   costs; then the capacity it logs ("capacity" lines) once it is idle again.
2. **One worker, a burst of 3 x capacity**: every call dispatched at once; a call is *placed*
   when the agent joins its room within `--greet-timeout`; only then does its caller dial in
   (callers use this machine's CPU too; refused calls need none). Each placed call has its
   conversation (two turns); reported: calls placed (target: capacity ± 1), the p95 of their
   turn latencies (target ≤ 1.5 s), and the worker's own histogram of answers to offers
   (`callboard_offer_answer_seconds{answer="refused"}` from its `/metrics`: every refusal
   ≤ 50 ms).
3. **Two workers, the same burst**: a second worker with the same agent name; the calls the
   first refuses must be placed on the second (placed per worker, from their job records).

    python -m bench.admission [--learn-calls 2] [--greet-timeout 20] [--cpu-budget 2]   # root
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from livekit import api
from livekit.protocol import models

from bench._side_by_side import AgentProcess, settle
from bench.voice import CALLER_NUMBER, CALLER_SAYS, EXAMPLE, TURN_P95_LIMIT_S, wait_registered
from callboard.voice_caller import (
    SipCaller,
    hibari_voice,
    percentile,
    sip_caller_token,
    sip_room_name,
)
from tests.interop.livekit_server import API_KEY, API_SECRET, start_server, stop_process
from tests.interop.netns import MEDIA_IP, enter_private_network

DEFAULT_LOAD_ENV: Final = "BENCH_DEFAULT_LOAD"
"""Makes bench/agents/*_voice_agent.py keep the worker's own load options."""
CPU_BUDGET_ENV: Final = "BENCH_CPU_BUDGET"
REFUSAL_LIMIT_S: Final = 0.05
BURST_FACTOR: Final = 3
TURN_TIMEOUT_S: Final = 60.0
CAPACITY_WAIT_S: Final = 60.0
AGENT_POLL_S: Final = 0.25
METRIC_LINE: Final = re.compile(
    r'^callboard_offer_answer_seconds_bucket\{answer="(?P<answer>\w+)",le="(?P<le>[^"]+)"\} '
    r"(?P<count>[0-9.e+]+)$"
)


@dataclass
class CallResult:
    placed: bool
    latencies: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class BurstResult:
    calls: int
    results: list[CallResult]
    refusals: int = 0
    refusals_within_limit: int = 0
    placed_by_worker: dict[str, int] = field(default_factory=dict)

    @property
    def placed(self) -> int:
        return sum(r.placed for r in self.results)

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.latencies]


def log_lines(worker: AgentProcess) -> list[dict[str, Any]]:
    out = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def capacity_of(worker: AgentProcess) -> tuple[int, dict[str, Any]] | None:
    """The last capacity the worker logged (with the learned cost), once measured."""
    lines = [r for r in log_lines(worker) if r.get("message") == "capacity"]
    measured = [r for r in lines if r.get("measured")]
    if not measured:
        return None
    return int(measured[-1]["capacity"]), measured[-1]


def http_port(worker: AgentProcess) -> int:
    for r in log_lines(worker):
        if r.get("message") == "worker http server listening":
            return int(r["port"])
    raise RuntimeError(f"{worker.label}: no HTTP port in its log")


def refusal_histogram(worker: AgentProcess) -> tuple[int, int]:
    """(refusals, refusals answered within REFUSAL_LIMIT_S) from the worker's /metrics."""
    url = f"http://127.0.0.1:{http_port(worker)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = within = 0
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m is None or m["answer"] != "refused":
            continue
        count = int(float(m["count"]))
        if m["le"] == "+Inf":
            total = count
        elif float(m["le"]) <= REFUSAL_LIMIT_S:
            within = max(within, count)
    return total, within


class AdmissionBench:
    def __init__(
        self,
        server: Any,
        workdir: Path,
        learn_calls: int,
        greet_timeout: float,
        cpu_budget: float | None,
    ) -> None:
        self.server = server
        self.cpu_budget = cpu_budget
        self.workdir = workdir
        self.learn_calls = learn_calls
        self.greet_timeout = greet_timeout
        self.voice = hibari_voice()
        self.capacity = 0
        self.learned: dict[str, Any] = {}
        self.bursts: list[tuple[str, BurstResult]] = []

    def worker(self, label: str) -> AgentProcess:
        env = {"BENCH_EXAMPLE": str(EXAMPLE), DEFAULT_LOAD_ENV: "1"}
        if self.cpu_budget is not None:
            env[CPU_BUDGET_ENV] = str(self.cpu_budget)
        return AgentProcess(
            "ours",
            "start",
            self.server,
            "admission",
            self.workdir / label,
            script="voice_agent",
            extra_env=env,
        )

    async def run(self, lk: api.LiveKitAPI) -> None:
        for label in ("a", "b"):
            (self.workdir / label).mkdir()
        first = self.worker("a")
        second: AgentProcess | None = None
        try:
            await wait_registered(first)
            learning = await self.burst(lk, [first], self.learn_calls)
            print(f"  learning: {learning.placed} of {self.learn_calls} calls placed")
            await settle(first)
            self.capacity, self.learned = await self.wait_capacity(first)
            print(f"  capacity {self.capacity}: {self.learned}")
            n = max(1, BURST_FACTOR * self.capacity)
            one = await self.burst(lk, [first], n)
            self.bursts.append(("one worker", one))
            await settle(first)
            second = self.worker("b")
            await wait_registered(second)
            two = await self.burst(lk, [first, second], n)
            self.bursts.append(("two workers", two))
        finally:
            for w in (first, second):
                if w is not None:
                    await asyncio.to_thread(w.stop)

    async def wait_capacity(self, worker: AgentProcess) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + CAPACITY_WAIT_S
        while (found := capacity_of(worker)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no measured capacity logged\n{worker.log_tail()}")
            await asyncio.sleep(0.5)
        return found

    async def burst(self, lk: api.LiveKitAPI, workers: list[AgentProcess], n: int) -> BurstResult:
        before = [refusal_histogram(w) for w in workers]
        records_before = [len(w.records()) for w in workers]
        results = await asyncio.gather(*(self.call(lk, workers[0].agent_name) for _ in range(n)))
        out = BurstResult(n, list(results))
        for w, (total0, within0), seen in zip(workers, before, records_before, strict=True):
            total, within = refusal_histogram(w)
            out.refusals += total - total0
            out.refusals_within_limit += within - within0
            out.placed_by_worker[w.record_path.parent.name] = len(w.records()) - seen
        return out

    async def call(self, lk: api.LiveKitAPI, agent_name: str) -> CallResult:
        """Dispatch, and only once the agent joined the room does a caller dial in: callers cost
        this 2-core machine CPU too, and the refused calls need none."""
        room = sip_room_name(CALLER_NUMBER)
        await lk.room.create_room(api.CreateRoomRequest(name=room, departure_timeout=1))
        try:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room)
            )
            if not await self.agent_joined(lk, room):
                return CallResult(placed=False)
            token = sip_caller_token(API_KEY, API_SECRET, room, CALLER_NUMBER)
            caller = SipCaller(self.server.ws_url, token, self.voice)
            await caller.dial()
            result = CallResult(placed=True)
            try:
                await caller.listen_to_greeting(timeout=TURN_TIMEOUT_S)
                for sentence in CALLER_SAYS:
                    turn = await caller.say(sentence, timeout=TURN_TIMEOUT_S)
                    if turn.latency_s is not None:
                        result.latencies.append(turn.latency_s)
            except Exception as e:
                result.error = f"{type(e).__name__}: {e}"
            finally:
                await caller.hang_up()
            return result
        finally:
            with contextlib.suppress(api.TwirpError):
                await lk.room.delete_room(api.DeleteRoomRequest(room=room))

    async def agent_joined(self, lk: api.LiveKitAPI, room: str) -> bool:
        deadline = time.monotonic() + self.greet_timeout
        while time.monotonic() < deadline:
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            if any(p.kind == models.ParticipantInfo.AGENT for p in listed.participants):
                return True
            await asyncio.sleep(AGENT_POLL_S)
        return False

    def report(self) -> str:
        lines = [
            f"capacity learned: {self.capacity} (job cost {self.learned.get('job_cpu')} core, "
            f"{self.learned.get('job_memory_mb')} MB; load_threshold "
            f"{self.learned.get('load_threshold')} of {self.learned.get('cpu_budget')} CPUs)",
            "",
            "| burst | calls | placed | placed per worker | turn p50 | turn p95 | failed "
            "| refusals | refused ≤ 50 ms |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, b in self.bursts:
            lat = b.latencies
            p50 = f"{percentile(lat, 50):.2f} s" if lat else "-"
            p95 = f"{percentile(lat, 95):.2f} s" if lat else "-"
            failed = sum(1 for r in b.results if r.error)
            lines.append(
                f"| {label} | {b.calls} | {b.placed} | {b.placed_by_worker} | {p50} | {p95} "
                f"| {failed} | {b.refusals} | {b.refusals_within_limit} |"
            )
        one = dict(self.bursts).get("one worker")
        if one is not None:
            lat = one.latencies
            checks = {
                "placed = capacity ± 1": abs(one.placed - self.capacity) <= 1,
                f"turn p95 ≤ {TURN_P95_LIMIT_S} s": bool(lat)
                and percentile(lat, 95) <= TURN_P95_LIMIT_S,
                "every refusal ≤ 50 ms": one.refusals == one.refusals_within_limit,
            }
            lines.append("")
            lines += [f"- {k}: {'met' if ok else 'MISSED'}" for k, ok in checks.items()]
        for label, b in self.bursts:
            for r in b.results:
                if r.error:
                    lines.append(f"  {label}: a placed call failed: {r.error}")
        return "\n".join(lines)


async def run(learn_calls: int, greet_timeout: float, cpu_budget: float | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    server = await asyncio.to_thread(start_server, "livekit-server", workdir, MEDIA_IP)
    try:
        bench = AdmissionBench(server, workdir, learn_calls, greet_timeout, cpu_budget)
        async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
            await bench.run(lk)
    finally:
        stop_process(server.proc)
    print("\nvoice calls admitted by a default-options worker (examples/receptionist.py)")
    print(bench.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    p.add_argument("--learn-calls", type=int, default=2, help="calls to learn the cost (2)")
    p.add_argument("--greet-timeout", type=float, default=20.0, help="placed if greeted (20 s)")
    p.add_argument(
        "--cpu-budget",
        type=float,
        default=None,
        help="the worker's cpu_budget (default: none, the machine's CPU counts, as in "
        "production; on a machine shared with other work, e.g. 2 counts only the worker's own)",
    )
    p.add_argument("--timeout", type=float, default=1200.0, help="overall limit, s (1200)")
    a = p.parse_args(argv)
    if a.learn_calls < 1:
        p.error("--learn-calls must be at least 1")
    with contextlib.suppress(KeyError):
        del os.environ["LIVEKIT_URL"]
    enter_private_network()
    main_task = run(a.learn_calls, a.greet_timeout, a.cpu_budget)
    return asyncio.run(asyncio.wait_for(main_task, a.timeout))


if __name__ == "__main__":
    sys.exit(main())
