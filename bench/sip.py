"""Concurrent phone calls into `callboard server`'s SIP gateway, on loopback.

`python -m bench.sip [--calls 20] [--seconds 5]` starts the server (with `--sip-port`) in its
own process, provisions a trunk and a dispatch rule, then places `--calls` calls at once from
this process (callboard's own SIP phone), each sending a tone for `--seconds` and listening.
It prints: call set-up time INVITE → 200 OK (p50/p99), frames lost each way (from the phones'
counts and the server's per-call log line), and the server's CPU per call.

The agent is a server-side stand-in (tests/server/sip/room_agent.py, echo mode) that joins
each call's room, subscribes to the phone, which is what makes the gateway answer (so its join
and subscribe are inside the set-up time), and publishes back what it hears: audio goes both
ways through the room. There is no reference side: livekit-sip is not served by the Go module
proxy here, so it cannot run next to ours.

`python -m bench.sip --agent [--calls 20] [--seconds 30]` (root: a private network namespace,
as bench/voice.py) answers with the real demo agent instead: examples/receptionist.py
(AgentSession, silero VAD, Whisper STT, scripted LLM, hibari TTS, offline) under callboard's
worker (bench/agents/ours_voice_agent.py), joining each call's room over WebRTC. The rule
dispatches it explicitly, so the worker's dispatch, the job process and the agent's join and
subscribe are inside the set-up time. Each phone (calls started `--stagger` s apart) waits for
the greeting, says one sentence (hibari), waits for the answer and stays on the line until
`--seconds` after it answered. It prints, besides the figures above, how many calls heard the
greeting and the answer, the turn time (end of the caller's sentence → first sound of the
answer), the frames the gateway owed the phones but did not send on time, and the CPU of the
server and of the worker's process tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import psutil

from bench._common import (
    LOOPBACK,
    ServerProcess,
    cpu_seconds,
    free_port,
    machine_summary,
    percentile,
)
from bench._side_by_side import AgentProcess
from callboard.log import setup_logging
from callboard.server.sip.codecs import FRAME_SAMPLES, Pcm
from callboard.server.sip.media import FRAME_S
from callboard.server.sip.phone import SipPhone
from callboard.server.sip.uac import DialTarget
from tests.interop.netns import NetnsUnavailable, enter_private_network
from tests.server.sip.provisioning import trunk_and_rule

CALLED: Final = "+15550100"
TIMEOUT_S: Final = 600.0
AGENT_NAME: Final = "receptionist"
CALLER_SAYS: Final = "Hello, what time are you open?"
REPLY_TIMEOUT_S: Final = 60.0
CPU_SAMPLE_S: Final = 0.5
MAX_CALLS: Final = 200


@dataclass
class SipServerProcess(ServerProcess):
    """The server with its SIP gateway on `sip_port` and, with `echo`, a stand-in agent that
    echoes each caller (`serve()` below); it logs each call's end (INFO)."""

    sip_port: int = field(default_factory=lambda: free_port())
    log_level: str = "INFO"
    echo: bool = True

    def command(self) -> list[str]:
        if not self.echo:
            return [*super().command(), "--sip-port", str(self.sip_port)]
        ports = ["--http-port", str(self.port), "--sip-port", str(self.sip_port)]
        return [sys.executable, "-m", "bench.sip", "--serve", *ports]


async def serve(http_port: int, sip_port: int) -> None:
    """`callboard server` with SIP, plus a server-side member in every called room that
    subscribes to the phone (so the call is answered) and says back what it hears."""
    from callboard.server.app import run_server
    from callboard.server.config import ServerConfig
    from tests.server.sip.room_agent import room_agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with (
        run_server(ServerConfig(port=http_port, sip_port=sip_port)) as srv,
        room_agent(srv, echo=True),
    ):
        await stop.wait()


@dataclass
class CallFigures:
    setup_s: float
    heard_frames: int
    echo_s: float
    lost_frames: int
    sent_packets: int


async def one_call(server: SipServerProcess, number: int, seconds: float) -> CallFigures:
    t = np.arange(int(8000 * seconds)) / 8000
    tone = (6000 * np.sin(2 * np.pi * (300 + number) * t)).astype(np.int16)
    target = DialTarget(LOOPBACK, server.sip_port, CALLED, f"+1555{number:07d}")
    answered_at: list[float] = []
    async with SipPhone() as phone:
        started = time.perf_counter()
        result = await phone.call(
            target,
            tone,
            listen=0.0,
            say=lambda line: (
                answered_at.append(time.perf_counter()) if line.startswith("answered") else None
            ),
        )
    if result.hung_up_by_callee:
        print(f"call {number}: the gateway hung up first", file=sys.stderr)
    if result.status != 200 or not answered_at:
        raise RuntimeError(f"call {number}: {result.status} {result.reason}")
    heard = len(result.audio) // FRAME_SAMPLES
    return CallFigures(
        answered_at[0] - started, heard, result.sound_seconds, result.lost, result.sent
    )


def server_call_stats(server: SipServerProcess) -> list[dict[str, int]]:
    stats = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if '"sip call ended"' in line:
            record = json.loads(line)
            stats.append({k: v for k, v in record.items() if k.startswith("rtp_")})
    return stats


async def run(calls: int, seconds: float) -> None:
    server = SipServerProcess()
    server.start()
    try:
        await trunk_and_rule(server.http_url, CALLED)
        process = psutil.Process(server.pid)
        cpu_before = sum(process.cpu_times()[:2])
        figures = await asyncio.gather(*(one_call(server, i, seconds) for i in range(calls)))
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        await asyncio.sleep(0.5)  # the server's call-ended lines
        stats = server_call_stats(server)
    finally:
        server.stop()
    setups = sorted(f.setup_s for f in figures)
    heard = sum(f.heard_frames for f in figures)
    lost_heard = sum(f.lost_frames for f in figures)
    echo_s = sorted(f.echo_s for f in figures)
    sent_by_phones = sum(f.sent_packets for f in figures)
    received = sum(s.get("rtp_received", 0) for s in stats)
    lost = sum(s.get("rtp_lost", 0) for s in stats)
    print(machine_summary())
    print(f"{calls} concurrent calls of {seconds:g} s, audio both ways (G.711 PCMU, 20 ms)")
    print(
        f"set-up INVITE -> 200 OK: p50 {percentile(setups, 50) * 1000:.0f} ms, "
        f"p99 {percentile(setups, 99) * 1000:.0f} ms, max {setups[-1] * 1000:.0f} ms"
    )
    print(
        f"gateway -> phones: {heard} frames heard, {lost_heard} lost "
        f"({100 * lost_heard / max(heard, 1):.2f} %); each phone heard its {seconds:g} s tone "
        f"echoed for {echo_s[0]:.1f}-{echo_s[-1]:.1f} s"
    )
    print(
        f"phones -> gateway: {received} RTP packets received of {sent_by_phones} sent, "
        f"{lost} lost in the jitter buffer ({100 * lost / max(received, 1):.2f} %)"
    )
    print(
        f"server CPU: {cpu:.2f} s for {calls} calls of {seconds:g} s "
        f"= {100 * cpu / (calls * seconds):.2f} % of a core per call"
    )


@dataclass
class AgentCallFigures:
    setup_s: float
    greeting: bool
    answer: bool
    turn_s: float
    heard_frames: int
    owed_frames: int
    lost_frames: int
    sent_packets: int


async def agent_call(
    server: SipServerProcess, number: int, speech: Pcm, seconds: float
) -> AgentCallFigures:
    """One caller of the receptionist: greeting, one sentence, the answer, then on the line
    until `seconds` after the 200 OK."""
    target = DialTarget(LOOPBACK, server.sip_port, CALLED, f"+1555{number:07d}")
    async with SipPhone() as phone:
        started = time.perf_counter()
        call = await phone.dial(target)
        answered = time.perf_counter()
        if not call.answered:
            raise RuntimeError(f"call {number}: {call.result.status} {call.result.reason}")
        greeting = await call.wait_utterance(0, REPLY_TIMEOUT_S)
        spoke = len(call.result.heard)
        answer = None
        if greeting is not None:
            call.media.play(speech)
            said = spoke + len(speech) // FRAME_SAMPLES
            answer = await call.wait_utterance(said, REPLY_TIMEOUT_S)
        await asyncio.sleep(max(0.0, answered + seconds - time.perf_counter()))
        result = await call.hang_up()
        on_line = time.perf_counter() - answered
    speech_frames = len(speech) // FRAME_SAMPLES
    turn = (answer[0] - spoke - speech_frames) * FRAME_S if answer else float("nan")
    heard = len(result.heard)
    owed = round(on_line / FRAME_S)
    return AgentCallFigures(
        answered - started,
        greeting is not None,
        answer is not None,
        turn,
        heard,
        owed,
        result.lost,
        result.sent,
    )


def caller_speech() -> Pcm:
    """CALLER_SAYS in hibari's voice, at the phone's 8 kHz."""
    from callboard.plugins.local import models
    from callboard.server.sip.audio import resample

    said = models.hibari_voice().synthesize(CALLER_SAYS, 1.0)
    return resample(np.frombuffer(said, dtype="<i2"), models.TTS_SAMPLE_RATE, 8000)


def receptionist_worker(server: SipServerProcess, workdir: Path, example: Path) -> AgentProcess:
    """Callboard's worker running `example` (the receptionist) for the rule's AGENT_NAME."""
    return AgentProcess(
        "ours",
        "start",
        server,
        AGENT_NAME,
        workdir,
        script="voice_agent",
        extra_env={"BENCH_EXAMPLE": str(example)},
    )


async def run_agent(calls: int, seconds: float, stagger: float) -> None:
    from bench.voice import EXAMPLE, wait_registered

    speech = caller_speech()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sip-"))
    server = SipServerProcess(echo=False)
    server.start()
    worker = receptionist_worker(server, workdir, EXAMPLE)
    try:
        await wait_registered(worker)
        await trunk_and_rule(server.http_url, CALLED, agents=[AGENT_NAME])
        server_cpu0, worker_cpu0 = cpu_seconds(server.pid), worker.cpu_seconds()
        began = time.perf_counter()

        async def staggered(i: int) -> AgentCallFigures:
            await asyncio.sleep(i * stagger)
            return await agent_call(server, i, speech, seconds)

        sampling = asyncio.create_task(sample_cpu(worker))
        try:
            figures = await asyncio.gather(*(staggered(i) for i in range(calls)))
        finally:
            sampling.cancel()
        wall = time.perf_counter() - began
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        worker_cpu = worker.cpu_seconds() - worker_cpu0
        await asyncio.sleep(0.5)  # the server's call-ended lines
        stats = server_call_stats(server)
    finally:
        worker.stop()
        server.stop()
    print_agent_figures(calls, seconds, figures, stats, wall, server_cpu, worker_cpu)


async def sample_cpu(worker: AgentProcess) -> None:
    """Read the worker tree's CPU every CPU_SAMPLE_S: a job process that ends before the run
    does keeps its last reading (one read at the end would miss it)."""
    while True:
        worker.cpu_seconds()
        await asyncio.sleep(CPU_SAMPLE_S)


def print_agent_figures(
    calls: int,
    seconds: float,
    figures: list[AgentCallFigures],
    stats: list[dict[str, int]],
    wall: float,
    server_cpu: float,
    worker_cpu: float,
) -> None:
    setups = sorted(f.setup_s for f in figures)
    turns = sorted(f.turn_s for f in figures if f.answer)
    heard = sum(f.heard_frames for f in figures)
    owed = sum(f.owed_frames for f in figures)
    lost = sum(f.lost_frames for f in figures)
    received = sum(s.get("rtp_received", 0) for s in stats)
    lost_in = sum(s.get("rtp_lost", 0) for s in stats)
    sent = sum(f.sent_packets for f in figures)
    print(machine_summary())
    print(f"{calls} calls to the receptionist, each {seconds:g} s on the line (G.711 PCMU)")
    print(
        f"set-up INVITE -> 200 OK: p50 {percentile(setups, 50) * 1000:.0f} ms, "
        f"p99 {percentile(setups, 99) * 1000:.0f} ms, max {setups[-1] * 1000:.0f} ms"
    )
    print(
        f"heard the greeting: {sum(f.greeting for f in figures)}/{calls}; the answer: "
        f"{sum(f.answer for f in figures)}/{calls}; turn (end of speech -> answer) "
        f"p50 {percentile(turns, 50):.2f} s, max {turns[-1] if turns else float('nan'):.2f} s"
    )
    print(
        f"gateway -> phones: {heard} frames heard of {owed} owed "
        f"({100 * (1 - heard / max(owed, 1)):.2f} % not sent on time), {lost} lost in transit"
    )
    print(
        f"phones -> gateway: {received} RTP packets received of {sent} sent, "
        f"{lost_in} lost in the jitter buffer ({100 * lost_in / max(received, 1):.2f} %)"
    )
    print(
        f"CPU over {wall:.0f} s: server {server_cpu:.1f} s, worker tree {worker_cpu:.1f} s = "
        f"{100 * (server_cpu + worker_cpu) / wall / calls:.1f} % of a core per call "
        f"(server {100 * server_cpu / wall / calls:.1f} %)"
    )


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="The HMAC key is")
    parser = argparse.ArgumentParser(prog="python -m bench.sip", description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--agent", action="store_true", help="answer with the demo agent")
    parser.add_argument("--stagger", type=float, default=0.25, help="s between calls (--agent)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--http-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sip-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        setup_logging("json", "INFO")
        asyncio.run(serve(args.http_port, args.sip_port))
        return 0
    if not 1 <= args.calls <= MAX_CALLS or not 0 < args.seconds <= 60:
        parser.error(f"--calls in 1..{MAX_CALLS}, --seconds in (0, 60]")
    if args.agent:
        try:
            enter_private_network()
        except NetnsUnavailable as e:
            print(f"bench.sip --agent needs a private network namespace: {e}", file=sys.stderr)
            return 1
        bench = run_agent(args.calls, args.seconds, args.stagger)
    else:
        bench = run(args.calls, args.seconds)
    try:
        asyncio.run(asyncio.wait_for(bench, TIMEOUT_S))
    except TimeoutError:
        print(f"bench.sip: did not finish within {TIMEOUT_S:g}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
