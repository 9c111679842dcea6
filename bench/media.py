"""Media through the server: concurrent 1:1 calls (a caller and an agent, audio both ways) on
`callboard server` and on the real livekit-server, in the same run.

    python -m bench.media [--calls 25] [--seconds 20] [--clients 4] [--clients-kind lean|sdk]
                          [--packets dtx|steady] [--latency-calls 1] [--timeout 900]

The bench moves into a private network namespace (tests/interop/netns.py; root) so that WebRTC
has an interface address and every packet stays on this machine. For each server it starts the
server, then `--clients` client processes sharing the calls, each call two participants in
their own room publishing one audio track and receiving the other's:

- `lean` (default): aiortc participants speaking LiveKit's /rtc signalling
  (bench/lean_participant.py) that replay Opus encoded once (a 200 ms tone burst a second, DTX
  as the SDK sends it, or `--packets steady`) and count what they receive without decoding;
  every call is timed (a burst's first packet sent → received, by its payload);
- `sdk`: the official rtc SDK (what users run; ~0.085 of a core per call on the client side),
  each publishing a tone in 200 ms bursts once a second (one `capture_frame` a second);
  `--latency-calls` calls per client process also decode what they hear.

While all calls run it samples the server process's CPU time for `--seconds`. It reports per
server:

- audio frames lost: 1 − Opus packets received by subscribers ÷ packets sent by publishers
  (counted by the lean clients themselves; the SDK's RTC stats; one packet is one 20 ms frame);
- CPU per forwarded track: server CPU over the window ÷ (window × tracks), in % of one core;
- mouth-to-ear latency: each burst's first packet sent (lean) or first frame handed to the SDK
  → the same burst's first packet received (lean) or first tone frame out of the receiving
  SDK (same clock; median and p95); "timed %" is the share of bursts heard within 0.5 s (the
  rest came later or not at all, and are not in the percentiles); the difference between the
  two servers is what ours adds;
- jitter p99 (lean): each packet's arrival against its RTP timestamp, beyond the least delayed
  packet of its stream: what a receiver's jitter buffer has to absorb;
- buffer ms (sdk): the receiving SDKs' mean jitter buffer delay (libwebrtc's
  jitterBufferDelay ÷ jitterBufferEmittedCount, every subscriber);
- the client processes' CPU over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil
from livekit import api, rtc

from bench._common import percentile
from bench.lean_participant import LeanParticipant, Pacer, encode_voice
from callboard.demo_tones import (
    AGENT_TONE_HZ,
    CALLER_TONE_HZ,
    FRAME_SAMPLES,
    TONE_RMS_MIN,
    tone_frame,
)
from callboard.voice_caller import FRAME_MS, SAMPLE_RATE
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerUnavailable,
    clean_env,
    start_server,
    stop_process,
)
from tests.interop.netns import MEDIA_IP, NetnsUnavailable, enter_private_network

SERVERS: Final = ("callboard", "livekit-server")
CLIENT_KINDS: Final = ("lean", "sdk")
BURST_FRAMES: Final = 20
PERIOD_FRAMES: Final = 100
RMS_STRIDE: Final = 8
"""A received frame's loudness from every 8th sample (6 kHz): enough for a 440/880 Hz tone."""
SOURCE_QUEUE_MS: Final = 20
"""A short SDK capture queue: a frame handed over is sent within this."""
WARMUP_S: Final = 3.0
TAIL_S: Final = 2.0
"""Speaking goes on this long after the CPU window."""
STUCK_SLACK_S: Final = 10.0
"""A speaker still talking this long after it should have stopped is stuck (its call broke)."""
IN_FLIGHT_S: Final = 1.0
"""Stats are read this long after the last frame was said: every packet has landed."""
READY_POLL_S: Final = 0.05
JOIN_TIMEOUT_S: Final = 60.0
JOIN_S_PER_CALL: Final = 4.0
MIN_CALLS: Final = 1
MAX_CALLS: Final = 200


SDK_LOG_EVENT: Final = b"\x92\x01"
"""How an FFI event carrying log records starts (`FfiEvent.logs`, field 18, length-delimited)."""


def skip_sdk_logs() -> None:
    """Drop the rtc SDK's forwarded log records before Python parses them.

    The SDK asks its native core for every log record (debug included) and parses each in
    Python on the core's thread, only to drop the debug ones; with dozens of participants in
    one process that was the client's busiest Python. Other events go on as the SDK's own
    callback handles them. Call before the first `rtc.Room` is used."""
    from livekit.rtc import _ffi_client
    from livekit.rtc._proto import ffi_pb2

    @ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)  # type: ignore[untyped-decorator]
    def on_event(data: Any, length: int) -> None:
        raw = ctypes.string_at(data, int(length))
        if raw.startswith(SDK_LOG_EVENT):
            return
        event = ffi_pb2.FfiEvent()
        event.ParseFromString(raw)
        if event.WhichOneof("message") == "panic":
            print("FFI panic:", event.panic.message, file=sys.stderr, flush=True)
            os._exit(1)
        _ffi_client.FfiClient.instance.queue.put(event)

    _ffi_client.ffi_event_callback = on_event  # the module keeps the reference alive


def token(identity: str, room: str) -> str:
    grants = api.VideoGrants(room_join=True, room=room)
    return api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(grants).to_jwt()


@dataclass
class Side:
    """One participant of a call: says bursts, hears the other's."""

    room: rtc.Room = field(default_factory=rtc.Room)
    sent_onsets: list[float] = field(default_factory=list)
    heard_onsets: list[float] = field(default_factory=list)

    async def speak(self, source: rtc.AudioSource, hz: float, seconds: float) -> None:
        """A second of sound (burst, then silence) per capture_frame: the SDK paces it out in
        real time through its short queue, and the client's Python stays out of the way."""
        period = period_frame(hz)
        for _ in range(int(seconds * 1000 / FRAME_MS / PERIOD_FRAMES)):
            self.sent_onsets.append(time.monotonic())
            await source.capture_frame(period)

    async def listen(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        loud = False
        async for event in stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)[::RMS_STRIDE].astype(float)
            now_loud = bool(samples.size) and float(np.sqrt(np.mean(samples**2))) >= TONE_RMS_MIN
            if now_loud and not loud:
                self.heard_onsets.append(time.monotonic())
            loud = now_loud


def period_frame(hz: float) -> rtc.AudioFrame:
    """One period: `BURST_FRAMES` of tone at `hz`, then silence."""
    burst = b"".join(bytes(tone_frame(hz, i).data) for i in range(BURST_FRAMES))
    silence = bytes(FRAME_SAMPLES * 2 * (PERIOD_FRAMES - BURST_FRAMES))
    return rtc.AudioFrame(burst + silence, SAMPLE_RATE, 1, FRAME_SAMPLES * PERIOD_FRAMES)


async def remote_track(room: rtc.Room) -> rtc.Track:
    found: asyncio.Future[rtc.Track] = asyncio.get_running_loop().create_future()

    def on(track: rtc.Track, *_: Any) -> None:
        if not found.done():
            found.set_result(track)

    room.on("track_subscribed", on)
    for p in room.remote_participants.values():
        for pub in p.track_publications.values():
            if pub.track is not None:
                on(pub.track)
    return await found


async def packets(room: rtc.Room) -> tuple[int, int, float, int]:
    """(audio packets sent, audio packets received, jitter buffer delay in seconds, samples
    emitted by the jitter buffer) for this participant, from RTC stats."""
    stats = await room.get_rtc_stats()
    sent = received = emitted = 0
    buffered = 0.0
    # both connections: with one peer connection (livekit-server's /rtc/v1) all is on one
    for s in [*stats.publisher_stats, *stats.subscriber_stats]:
        if s.HasField("outbound_rtp") and s.outbound_rtp.stream.kind == "audio":
            sent += s.outbound_rtp.sent.packets_sent
        if s.HasField("inbound_rtp") and s.inbound_rtp.stream.kind == "audio":
            received += s.inbound_rtp.received.packets_received
            buffered += s.inbound_rtp.inbound.jitter_buffer_delay
            emitted += s.inbound_rtp.inbound.jitter_buffer_emitted_count
    return sent, received, buffered, emitted


def latencies(sent_onsets: list[float], heard_onsets: list[float]) -> list[float]:
    """Each burst's onset → the receiver's next onset after it (bursts are 1 s apart)."""
    out = []
    heard = sorted(heard_onsets)
    for sent in sent_onsets:
        later = [h - sent for h in heard if 0 <= h - sent < PERIOD_FRAMES * FRAME_MS / 1000 / 2]
        if later:
            out.append(later[0])
    return out


async def run_sdk_client(
    url: str,
    calls: int,
    latency_calls: int,
    prefix: str,
    seconds: float,
    ready: Path,
) -> dict[str, Any]:
    """`calls` calls in this process: join and publish, signal ready, speak once a line comes
    on stdin (all clients are ready), and report. Only the first
    `latency_calls` decode what they hear (mouth-to-ear latency): every received frame
    costs the SDK's Python side an event, which the client processes cannot afford for all."""
    skip_sdk_logs()
    pairs = [(Side(), Side()) for _ in range(calls)]
    for i, (caller, agent) in enumerate(pairs):
        room = f"{prefix}-{i}"
        await caller.room.connect(url, token("caller", room))
        await agent.room.connect(url, token("agent", room))
    tasks: list[asyncio.Task[None]] = []
    voices = []
    for caller, agent in pairs:
        for side, hz in ((caller, CALLER_TONE_HZ), (agent, AGENT_TONE_HZ)):
            source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=SOURCE_QUEUE_MS)
            track = rtc.LocalAudioTrack.create_audio_track("mic", source)
            opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            await side.room.local_participant.publish_track(track, opts)
            voices.append((side, source, hz))
    for i, (caller, agent) in enumerate(pairs):
        heard = [await remote_track(caller.room), await remote_track(agent.room)]
        if i < latency_calls:  # every other call is counted from RTC stats only
            tasks.append(asyncio.create_task(caller.listen(heard[0])))
            tasks.append(asyncio.create_task(agent.listen(heard[1])))
    await asyncio.to_thread(ready.write_text, str(time.monotonic()))
    await asyncio.to_thread(sys.stdin.readline)  # every client speaks from the same moment
    speak_s = WARMUP_S + seconds + TAIL_S
    speaking = [asyncio.create_task(side.speak(src, hz, speak_s)) for side, src, hz in voices]
    cpu0, t0 = time.process_time(), time.monotonic()
    _, stuck = await asyncio.wait(speaking, timeout=speak_s + STUCK_SLACK_S)
    client_cores = (time.process_time() - cpu0) / (time.monotonic() - t0)
    for t in stuck:  # a source nobody reads any more: its call broke
        t.cancel()
    await asyncio.sleep(IN_FLIGHT_S)
    totals = [0, 0]
    buffered, emitted = 0.0, 0
    for side in (s for pair in pairs for s in pair):
        sent, received, delay, samples = await packets(side.room)
        totals[0] += sent
        totals[1] += received
        buffered += delay
        emitted += samples
    lat: list[float] = []
    for caller, agent in pairs[:latency_calls]:
        lat += latencies(caller.sent_onsets, agent.heard_onsets)
        lat += latencies(agent.sent_onsets, caller.heard_onsets)
    bursts = sum(len(side.sent_onsets) for pair in pairs[:latency_calls] for side in pair)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    broken = sum(not side.room.isconnected() for pair in pairs for side in pair)
    for side in (s for pair in pairs for s in pair):
        await side.room.disconnect()
    return {
        "sent": totals[0],
        "received": totals[1],
        "latencies": lat,
        "bursts_sent": bursts,
        "jitter_buffer_s": buffered,
        "jitter_buffer_samples": emitted,
        "stuck": len(stuck),
        "client_cores": client_cores,
        "disconnected": broken,
    }


async def run_lean_client(
    url: str, calls: int, prefix: str, seconds: float, ready: Path, dtx: bool
) -> dict[str, Any]:
    """`calls` calls of lean participants (bench/lean_participant.py) in this process: join,
    publish and subscribe, signal ready, replay Opus from a line on stdin, and report what
    each side sent and received (counted by the clients themselves)."""
    voice = encode_voice(dtx)
    pairs = []
    for i in range(calls):
        room = f"{prefix}-{i}"
        caller = LeanParticipant(url, token("caller", room), voice)
        agent = LeanParticipant(url, token("agent", room), voice)
        pairs.append((caller, agent))
        for side in (caller, agent):
            await side.connect()
            await side.publish()
    sides = [s for pair in pairs for s in pair]
    for side in sides:
        await side.subscribed()
    await asyncio.to_thread(ready.write_text, str(time.monotonic()))
    await asyncio.to_thread(sys.stdin.readline)  # every client speaks from the same moment
    speak_s = WARMUP_S + seconds + TAIL_S
    pacer = Pacer(sides)
    cpu0, t0 = time.process_time(), time.monotonic()
    await pacer.run(speak_s)
    client_cores = (time.process_time() - cpu0) / (time.monotonic() - t0)
    await asyncio.sleep(IN_FLIGHT_S)
    lat: list[float] = []
    for caller, agent in pairs:
        lat += latencies(caller.sent_onsets, agent.ear.onsets)
        lat += latencies(agent.sent_onsets, caller.ear.onsets)
    bursts = sum(len(s.sent_onsets) for s in sides)
    broken = sum(s.closed is not None for s in sides)
    result = {
        "sent": sum(s.packets_sent for s in sides),
        "received": sum(s.ear.packets for s in sides),
        "latencies": lat,
        "bursts_sent": bursts,
        "stuck": 0,
        "client_cores": client_cores,
        "disconnected": broken,
        "late_ms_p99": 1000 * percentile(sorted(pacer.lateness), 99),
        "jitter": [round(j, 4) for s in sides for j in s.ear.jitter()],
        "silent_sides": sum(s.ear.packets == 0 for s in sides),
        "per_side": [(s.packets_sent, s.ear.packets) for s in sides],
    }
    for side in sides:
        await side.aclose()
    return result


def measure(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One server: start it, run the clients, sample its CPU over the window."""
    server = start_server(kind, workdir / kind, media_ip=MEDIA_IP)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc = psutil.Process(server.proc.pid)
        per_client = [
            args.calls // args.clients + (i < args.calls % args.clients)
            for i in range(args.clients)
        ]
        readies, outs = [], []
        for i, n in enumerate(c for c in per_client if c):
            ready, out = workdir / f"{kind}-{i}.ready", workdir / f"{kind}-{i}.json"
            readies.append(ready)
            outs.append(out)
            cmd = [
                sys.executable,
                "-m",
                "bench.media",
                "--client",
                server.ws_url,
                "--calls",
                str(n),
                "--seconds",
                str(args.seconds),
                "--latency-calls",
                str(args.latency_calls),
                "--clients-kind",
                args.clients_kind,
                "--packets",
                args.packets,
                "--prefix",
                f"{kind}-{i}",
                "--ready",
                str(ready),
                "--out",
                str(out),
            ]
            procs.append(subprocess.Popen(cmd, env=clean_env(), stdin=subprocess.PIPE))
        deadline = time.monotonic() + JOIN_TIMEOUT_S + JOIN_S_PER_CALL * args.calls
        while not all(r.exists() for r in readies):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tail = "\n".join(
                    line for line in server.log_tail(20000).splitlines() if "WARN" in line.upper()
                )
                raise RuntimeError(f"{kind}: the calls did not all start\n{tail[-3000:]}")
            time.sleep(READY_POLL_S)
        for p in procs:  # go
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.close()
        time.sleep(WARMUP_S)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        for p in procs:
            p.wait(timeout=args.seconds + JOIN_TIMEOUT_S)
        results = [
            json.loads(o.read_text()) if o.exists() else crashed(n)
            for o, n in zip(outs, (c for c in per_client if c), strict=True)
        ]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stop_process(server.proc)
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    jitter = sorted(x for r in results for x in r.get("jitter", []))
    buffered = sum(r.get("jitter_buffer_s", 0.0) for r in results)
    emitted = sum(r.get("jitter_buffer_samples", 0) for r in results)
    tracks = 2 * args.calls
    return {
        "server": kind,
        "calls": args.calls,
        "tracks": tracks,
        "cpu_cores": (cpu1 - cpu0) / (t1 - t0),
        "cpu_per_track_pct": 100 * (cpu1 - cpu0) / (t1 - t0) / tracks,
        "packets_sent": sent,
        "packets_received": received,
        "lost_pct": 100 * (1 - received / sent) if sent else float("nan"),
        "latency_ms_p50": 1000 * percentile(lat, 50),
        "latency_ms_p95": 1000 * percentile(lat, 95),
        "bursts": len(lat),
        "bursts_timed_pct": 100 * len(lat) / max(1, sum(r.get("bursts_sent", 0) for r in results)),
        "jitter_ms_p95": 1000 * percentile(jitter, 95),
        "jitter_ms_p99": 1000 * percentile(jitter, 99),
        "jitter_buffer_ms": 1000 * buffered / emitted if emitted else float("nan"),
        "broken_sides": sum(r["stuck"] + r["disconnected"] for r in results),
        "client_cores": sum(r["client_cores"] for r in results),
        "clients_crashed": sum(r.get("crashed", 0) for r in results),
        "client_late_ms_p99": max(r.get("late_ms_p99", 0.0) for r in results),
    }


def crashed(calls: int) -> dict[str, Any]:
    """What a client process that died (the SDK's native core can panic) contributes: its calls
    are broken, its packets unknown (lost % is then over the other clients' calls)."""
    return {
        "sent": 0,
        "received": 0,
        "latencies": [],
        "stuck": 0,
        "disconnected": 2 * calls,
        "client_cores": 0.0,
        "crashed": 1,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'server':16} {'calls':>5} {'lost %':>7} {'CPU cores':>9} {'CPU/track %':>11} "
        f"{'m2e p50 ms':>10} {'m2e p95 ms':>10} {'timed %':>7} {'jitter p99':>10} "
        f"{'buffer ms':>9} {'broken':>6} "
        f"{'client cores':>12}"
    )
    for r in rows:
        print(
            f"{r['server']:16} {r['calls']:>5} {r['lost_pct']:>7.2f} {r['cpu_cores']:>9.2f} "
            f"{r['cpu_per_track_pct']:>11.2f} {r['latency_ms_p50']:>10.1f} "
            f"{r['latency_ms_p95']:>10.1f} {r['bursts_timed_pct']:>7.0f} "
            f"{r['jitter_ms_p99']:>10.1f} {r['jitter_buffer_ms']:>9.1f} {r['broken_sides']:>6} "
            f"{r['client_cores']:>12.2f}"
        )
    if len(rows) == 2:
        ours, theirs = rows
        print(
            f"CPU per track, callboard / livekit-server: "
            f"{ours['cpu_per_track_pct'] / theirs['cpu_per_track_pct']:.2f}x; "
            f"added mouth-to-ear latency (p50): "
            f"{ours['latency_ms_p50'] - theirs['latency_ms_p50']:+.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.media", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--latency-calls",
        type=int,
        default=1,
        help="calls per client process that decode what they hear, for mouth-to-ear latency",
    )
    parser.add_argument(
        "--clients-kind",
        choices=CLIENT_KINDS,
        default="lean",
        help="lean: aiortc participants replaying pre-encoded Opus (bench/lean_participant.py); "
        "sdk: the official livekit rtc SDK (what users run; ~0.085 core per call)",
    )
    parser.add_argument(
        "--packets",
        choices=("dtx", "steady"),
        default="dtx",
        help="lean clients: what a track sends (dtx: as libwebrtc with Opus DTX, 21 packets/s; "
        "steady: 50 packets/s)",
    )
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", help="keep the servers' logs here (default: a temp dir)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not MIN_CALLS <= args.calls <= MAX_CALLS:
        parser.error(f"--calls must be in {MIN_CALLS}..{MAX_CALLS}")
    if args.client:
        if args.clients_kind == "sdk":
            client = run_sdk_client(
                args.client,
                args.calls,
                args.latency_calls,
                args.prefix,
                args.seconds,
                Path(args.ready),
            )
        else:
            client = run_lean_client(
                args.client,
                args.calls,
                args.prefix,
                args.seconds,
                Path(args.ready),
                dtx=args.packets == "dtx",
            )
        result = asyncio.run(client)
        Path(args.out).write_text(json.dumps(result))
        return 0
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        print(f"bench.media needs a private network namespace: {e}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp_dir:
        tmp = args.workdir or tmp_dir
        for kind in args.servers.split(","):
            if time.monotonic() > deadline:
                print(f"--timeout reached before {kind}", file=sys.stderr)
                break
            try:
                rows.append(measure(kind, args, Path(tmp)))
            except ServerUnavailable as e:
                print(f"{kind}: skipped ({e})", file=sys.stderr)
            print(json.dumps(rows[-1]) if rows else "", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
