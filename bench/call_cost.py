"""Where one phone call's CPU goes: the job process and the server, per thread, per phase.

`python -m bench.call_cost [--seconds 20] [--py-spy DIR]` (root: a private network namespace,
as `bench.sip --agent`) starts `callboard server` with its SIP gateway and callboard's worker
running examples/receptionist.py, places one SIP call and measures two phases of it:

- **idle**: the caller listens in silence (after the greeting) for `--seconds`;
- **talking**: the caller says "Hello, what time are you open?" (hibari), waits for the answer
  and says it again, for `--seconds`.

For each phase it prints the CPU (% of a core) of the job process, the server and the worker's
other processes, and of each thread of the job process and of the server (from
/proc/<pid>/task/*/stat, grouped by thread name). With `--py-spy DIR` it also records each
phase of the job process with py-spy (raw folded stacks in DIR, needs `py-spy` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench._common import LOOPBACK, cpu_seconds, machine_summary
from bench._side_by_side import AgentProcess
from bench.sip import (
    AGENT_NAME,
    CALLED,
    REPLY_TIMEOUT_S,
    SipServerProcess,
    caller_speech,
    receptionist_worker,
)
from bench.voice import EXAMPLE
from callboard.server.sip.codecs import FRAME_SAMPLES, Pcm
from callboard.server.sip.media import FRAME_S
from callboard.server.sip.phone import ActiveCall, SipPhone
from callboard.server.sip.uac import DialTarget
from tests.interop.netns import NetnsUnavailable, enter_private_network

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
SETTLE_S: Final = 2.0
"""After the greeting (or the last answer) before a phase starts."""
JOB_START_TIMEOUT_S: Final = 30.0


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of `pid`, with its name: {tid: (name, seconds)}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def by_name(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per thread name between two `thread_cpu` readings (new threads count whole)."""
    used: dict[str, float] = collections.defaultdict(float)
    for tid, (name, seconds) in after.items():
        used[name] += seconds - before.get(tid, (name, 0.0))[1]
    return dict(used)


@dataclass
class Phase:
    name: str
    seconds: float
    job: dict[str, float]
    server: dict[str, float]
    rest: float
    turns: list[float]

    def report(self) -> str:
        def pct(cpu: float) -> str:
            return f"{100 * cpu / self.seconds:5.1f} %"

        job, server = sum(self.job.values()), sum(self.server.values())
        lines = [
            f"--- {self.name}: {self.seconds:.1f} s"
            + (
                f", {len(self.turns)} turns {', '.join(f'{t:.2f}' for t in self.turns)} s"
                if self.turns
                else ""
            ),
            f"job process {pct(job)}   server {pct(server)}   "
            f"worker's other processes {pct(self.rest)}",
        ]
        for label, threads in (("job", self.job), ("server", self.server)):
            for name, cpu in sorted(threads.items(), key=lambda kv: -kv[1]):
                if cpu * 1000 / self.seconds >= 1:  # at least 0.1 % of a core
                    lines.append(f"  {label:6} {name:20} {pct(cpu)}")
        return "\n".join(lines)


class PySpy:
    """py-spy recording one phase of some processes (raw folded stacks, NAME-LABEL.txt)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, pids: dict[str, int], name: str, seconds: float) -> None:
        if self.out_dir is None:
            return
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--py-spy needs py-spy on PATH (pip install py-spy)")
        for label, pid in pids.items():
            out = self.out_dir / f"{name}-{label}.txt"
            cmd = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100"]
            cmd += ["--format", "raw", "-o", str(out), "--nonblocking", "--threads"]
            self.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

    def wait(self) -> None:
        for proc in self.procs:
            proc.wait(timeout=30)
        self.procs = []


async def talk(call: ActiveCall, speech: Pcm, until: float) -> list[float]:
    """Say `speech`, wait for the answer, again, until `until`; the turn times."""
    turns = []
    while time.perf_counter() < until:
        spoke = len(call.result.heard)
        call.media.play(speech)
        said = spoke + len(speech) // FRAME_SAMPLES
        answer = await call.wait_utterance(said, REPLY_TIMEOUT_S)
        if answer is None:
            break
        turns.append((answer[0] - said) * FRAME_S)
    return turns


async def measure(
    name: str,
    seconds: float,
    job_pid: int,
    server: SipServerProcess,
    worker: AgentProcess,
    spy: PySpy,
    action: asyncio.Future[list[float]] | None = None,
) -> Phase:
    spy.start({"job": job_pid, "server": server.pid}, name, seconds)
    job0, srv0 = thread_cpu(job_pid), thread_cpu(server.pid)
    tree0 = worker.cpu_seconds() - cpu_seconds(job_pid)
    began = time.perf_counter()
    turns = await action if action is not None else []
    await asyncio.sleep(max(0.0, began + seconds - time.perf_counter()))
    wall = time.perf_counter() - began
    job1, srv1 = thread_cpu(job_pid), thread_cpu(server.pid)
    rest = worker.cpu_seconds() - cpu_seconds(job_pid) - tree0
    spy.wait()
    return Phase(name, wall, by_name(job0, job1), by_name(srv0, srv1), rest, turns)


async def run(seconds: float, py_spy_dir: Path | None, example: Path) -> list[Phase]:
    from bench.voice import wait_registered
    from tests.server.sip.provisioning import trunk_and_rule

    speech = caller_speech()
    workdir = Path(tempfile.mkdtemp(prefix="bench-call-cost-"))
    server = SipServerProcess(echo=False)
    server.start()
    worker = receptionist_worker(server, workdir, example)
    spy = PySpy(py_spy_dir)
    try:
        await wait_registered(worker)
        await trunk_and_rule(server.http_url, CALLED, agents=[AGENT_NAME])
        async with SipPhone() as phone:
            call = await phone.dial(DialTarget(LOOPBACK, server.sip_port, CALLED, "+15550001"))
            if not call.answered:
                raise RuntimeError(f"call: {call.result.status} {call.result.reason}")
            if await call.wait_utterance(0, REPLY_TIMEOUT_S) is None:
                raise RuntimeError(f"no greeting\n{worker.log_tail()}")
            records = worker.records()
            if not records:
                raise RuntimeError("the job recorded no start")
            job_pid = int(records[-1]["pid"])
            await asyncio.sleep(SETTLE_S)
            phases = [await measure("idle", seconds, job_pid, server, worker, spy)]
            until = time.perf_counter() + seconds
            action = asyncio.ensure_future(talk(call, speech, until))
            phases.append(await measure("talking", seconds, job_pid, server, worker, spy, action))
            await call.hang_up()
    finally:
        worker.stop()
        server.stop()
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call_cost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--py-spy", type=Path, default=None, help="record each phase here")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="the agent module")
    args = parser.parse_args(argv)
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        print(f"bench.call_cost needs a private network namespace: {e}", file=sys.stderr)
        return 1
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    phases = asyncio.run(run(args.seconds, args.py_spy, args.example.resolve()))
    print(machine_summary())
    for phase in phases:
        print(phase.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
