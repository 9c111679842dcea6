"""One call to a voice agent example through the real livekit-server, run by
tests/interop/test_receptionist.py in a process of its own as
`python -m tests.interop.receptionist_call WORKDIR SIDE EXAMPLE [SENTENCE]` (SIDE: callboard or
livekit-agents; EXAMPLE: the agent file; SENTENCE: what the caller says).

Like tests/interop/media_call.py it first moves into a private network namespace (WebRTC needs
a non-loopback address; nothing leaves the machine), then starts livekit-server and the worker
(`python tests/interop/agents/receptionist_probe.py start`, the example under SIDE's worker),
creates a room, joins it as the caller and dispatches the agent. The caller hears the agent's
greeting, says one sentence (spoken offline by hibari), hears the answer, and hangs up; the
audio it heard is transcribed offline (Whisper tiny.en). Then it waits for the job's end on the
worker (the probe's report) and on the server (its `job ended` log line).

Output in WORKDIR: report.json (read by the test), probe.jsonl (what the job saw), worker.log,
livekit-server-*.log. Exit status SKIP_EXIT when the namespace cannot be had.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
from livekit import api, rtc

from callboard.plugins.local import models
from tests.interop.agents import receptionist_names as probe
from tests.interop.call_process import against_server, call_script_main, load_meanwhile
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerProcess,
    clean_env,
)
from tests.interop.media_call import server_job_ended
from tests.interop.support import AgentWorker, stop_agent_worker, wait_until
from tests.interop.worker_tap import WorkerTap

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PROBE_SCRIPT: Final = REPO_ROOT / "tests" / "interop" / "agents" / "receptionist_probe.py"
PROBE_REPORT: Final = "probe.jsonl"
CALLER_IDENTITY: Final = "caller"
CALLER_SAYS: Final = "Hello, I would like to book an appointment for Monday, please."
SAMPLE_RATE: Final = 48000
STT_RATE: Final = 16000
FRAME_MS: Final = 20
VOICED_RMS: Final = 300.0
"""Frames of the agent's audio louder than this (int16 RMS) are speech."""
END_OF_REPLY_SILENCE_S: Final = 1.2
REGISTER_TIMEOUT_S: Final = 90.0
GREETING_TIMEOUT_S: Final = 30.0
REPLY_TIMEOUT_S: Final = 30.0
JOB_END_TIMEOUT_S: Final = 30.0
CALL_TIMEOUT_S: Final = 150.0
DEPARTURE_TIMEOUT_S: Final = 1
"""The room closes this long after its last caller left (what ends the agent's job)."""


def rms(samples: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(np.mean(samples.astype(float) ** 2))) if len(samples) else 0.0


class Ear:
    """The caller's speaker: the agent's audio at 16 kHz, with when each frame arrived."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, np.ndarray[Any, Any]]] = []

    async def listen(self, track: rtc.Track) -> None:
        async for ev in rtc.AudioStream(track, sample_rate=STT_RATE, num_channels=1):
            samples = np.frombuffer(ev.frame.data, dtype=np.int16).copy()
            self.frames.append((time.monotonic(), samples))

    def voiced_since(self, since: float) -> list[float]:
        return [
            t
            for t, s in self.frames
            if t >= since and np.sqrt(np.mean(s.astype(float) ** 2)) > VOICED_RMS
        ]

    def utterance_since(self, since: float) -> tuple[float, float] | None:
        """(first voiced, last voiced) of a reply that started after `since` and has been
        followed by END_OF_REPLY_SILENCE_S of silence; None while still speaking or silent."""
        voiced = self.voiced_since(since)
        if not voiced or time.monotonic() - voiced[-1] < END_OF_REPLY_SILENCE_S:
            return None
        return voiced[0], voiced[-1]

    def pcm(self, start: float, end: float) -> bytes:
        chunks = [s for t, s in self.frames if start - 0.5 <= t <= end + 0.1]
        return np.concatenate(chunks).astype("<i2").tobytes() if chunks else b""


class Mouth:
    """The caller's microphone: silence in real time, or a queued sentence."""

    def __init__(self) -> None:
        self.source = rtc.AudioSource(SAMPLE_RATE, 1)
        self._queued: list[rtc.AudioFrame] = []
        self.done_speaking = asyncio.Event()
        self.done_speaking.set()

    def say(self, pcm24k: bytes) -> None:
        resampler = rtc.AudioResampler(24000, SAMPLE_RATE, num_channels=1)
        frames = resampler.push(bytearray(pcm24k)) + resampler.flush()
        audio = rtc.combine_audio_frames(frames)
        step = SAMPLE_RATE * FRAME_MS // 1000
        data = np.frombuffer(audio.data, dtype=np.int16)
        for i in range(0, len(data), step):
            chunk = data[i : i + step]
            chunk = np.pad(chunk, (0, step - len(chunk)))
            self._queued.append(rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, step))
        self.done_speaking.clear()

    async def run(self) -> None:
        step = SAMPLE_RATE * FRAME_MS // 1000
        silence = rtc.AudioFrame(bytes(step * 2), SAMPLE_RATE, 1, step)
        while True:
            if self._queued:
                await self.source.capture_frame(self._queued.pop(0))
                if not self._queued:
                    self.done_speaking.set()
            else:
                await self.source.capture_frame(silence)


def caller_token(room: str) -> str:
    grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True)
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_identity(CALLER_IDENTITY)
        .with_name("Caller")
        .with_grants(grants)
        .to_jwt()
    )


def probe_events(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / PROBE_REPORT
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def start_worker(url: str, side: str, example: Path, workdir: Path) -> AgentWorker:
    env = clean_env() | {
        "LIVEKIT_URL": url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "PYTHONPATH": str(REPO_ROOT),
        probe.SIDE_ENV: side,
        probe.FILE_ENV: str(example),
        probe.REPORT_ENV: str(workdir / PROBE_REPORT),
    }
    with open(workdir / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(PROBE_SCRIPT), "start"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    return AgentWorker(probe.AGENT_NAME, proc, workdir / PROBE_REPORT, workdir / "worker.log")


def transcribe(pcm16k: bytes) -> str:
    text, _ = models.whisper().transcribe(pcm16k, "en")
    return text


async def call(
    server: ServerProcess,
    side: str,
    example: Path,
    says: str,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    tap = WorkerTap(server.ws_url)
    await tap.start()
    worker = start_worker(tap.url, side, example, workdir)
    try:
        await converse(server, tap, worker, says, workdir, report)
    finally:
        await asyncio.to_thread(stop_agent_worker, worker)
        await tap.aclose()


async def converse(
    server: ServerProcess,
    tap: WorkerTap,
    worker: AgentWorker,
    says: str,
    workdir: Path,
    report: dict[str, Any],
) -> None:
    log_text = lambda: worker.log_path.read_text(errors="replace")  # noqa: E731
    await wait_until(
        lambda: "registered worker" in log_text() or worker.proc.poll() is not None,
        "the worker to register",
        REGISTER_TIMEOUT_S,
        worker.log_tail,
    )
    assert worker.proc.poll() is None, worker.log_tail()
    room_name = f"reception-{os.urandom(4).hex()}"
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        await lk.room.create_room(
            api.CreateRoomRequest(name=room_name, departure_timeout=DEPARTURE_TIMEOUT_S)
        )
        room = rtc.Room()
        ear, mouth = Ear(), Mouth()
        tasks: list[asyncio.Task[None]] = []

        @room.on("track_subscribed")
        def on_track(track: rtc.Track, *_: Any) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                tasks.append(asyncio.create_task(ear.listen(track)))

        await room.connect(server.ws_url, caller_token(room_name))
        await room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("mic", mouth.source),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
        )
        tasks.append(asyncio.create_task(mouth.run()))
        said = models.hibari_voice().synthesize(says, 1.0)

        @room.on("disconnected")
        def on_disconnected(reason: Any) -> None:
            report["caller_disconnected"] = rtc.DisconnectReason.Name(reason)

        dispatched = time.monotonic()
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=probe.AGENT_NAME, room=room_name)
        )
        try:
            start, end = await wait_until(
                lambda: ear.utterance_since(dispatched),
                "the agent's greeting",
                GREETING_TIMEOUT_S,
                worker.log_tail,
            )
            report["greeting"] = transcribe(ear.pcm(start, end))
            mouth.say(said)
            await mouth.done_speaking.wait()
            spoke = time.monotonic()
            start, end = await wait_until(
                lambda: ear.utterance_since(spoke), "the agent's answer", REPLY_TIMEOUT_S
            )
            report["answer"] = transcribe(ear.pcm(start, end))
            report["answer_after_s"] = round(start - spoke, 2)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await room.disconnect()
            hung_up = time.monotonic()
        shutdown = await wait_until(
            lambda: [e for e in probe_events(workdir) if e["event"] == "shutdown"],
            "the job's shutdown",
            JOB_END_TIMEOUT_S,
            worker.log_tail,
        )
        report["job_ended_after_hang_up_s"] = round(time.monotonic() - hung_up, 2)
        (context,) = [e for e in probe_events(workdir) if e["event"] == "context"]
        report["server_ended"] = await wait_until(
            lambda: server_job_ended(server, context["job_id"]),
            "the server to log the job's end",
            JOB_END_TIMEOUT_S,
            server.log_tail,
        )
        report["shutdown"] = shutdown[0]
        report["worker_reported"] = await wait_until(
            lambda: tap.final_status(context["job_id"]),
            "the worker to report the job's end",
            JOB_END_TIMEOUT_S,
        )
    report["probe"] = probe_events(workdir)


def main(argv: list[str]) -> int:
    workdir, side, example = Path(argv[1]), argv[2], Path(argv[3])
    says = argv[4] if len(argv) > 4 else CALLER_SAYS
    report: dict[str, Any] = {"side": side}

    def run() -> None:
        load_meanwhile(lambda: (models.whisper(), models.hibari_voice()))

        async def main_call(server: ServerProcess) -> None:
            await call(server, side, example, says, workdir, report)

        against_server("livekit-server", workdir, report, main_call, CALL_TIMEOUT_S)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
