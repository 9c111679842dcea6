"""A voice agent for the media test (tests/interop/test_media.py), run by a callboard worker.

It joins the job's room, waits for the caller, publishes its own tone (AGENT_TONE_HZ) and
measures what it hears from the caller. It appends JSON lines to the file named by REPORT_ENV:
`caller` (who it waited for), `heard` (once HEARD_TONE_FRAMES frames of tone arrived) and
`shutdown` (the final counts, from its shutdown callback). It also logs the final counts, which
the worker relays with the job's job_id, room and pid.

The tone helpers (`Tone`, `ToneMeter`, `speak`, `listen`) are shared with the test's caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from livekit import rtc

from callboard import JobContext

REPORT_ENV: Final = "CALLBOARD_MEDIA_REPORT"
SAMPLE_RATE: Final = 48000
FRAME_MS: Final = 10
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000
CALLER_TONE_HZ: Final = 440.0
AGENT_TONE_HZ: Final = 880.0
TONE_AMPLITUDE: Final = 0.3 * 32767
TONE_RMS_MIN: Final = 1000.0
"""A frame louder than this (about -30 dBFS) carries tone; decoded silence and comfort noise are
far below. The audio stream yields frames even when no packet arrives, so frames alone prove
nothing: tone frames do."""
HEARD_TONE_FRAMES: Final = 100
MAX_SPEAK_S: Final = 20.0
"""Upper bound of either side's tone (the call is hung up long before)."""

log = logging.getLogger("media_agent")


def report(event: str, **fields: Any) -> None:
    """Append one JSON line to the report file (one write: lines of processes do not mix)."""
    line = json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields})
    with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as f:
        f.write(line + "\n")


class Tone:
    """A continuous sine, 10 ms at a time."""

    def __init__(self, hz: float) -> None:
        self._hz = hz
        self._next = 0

    def frame(self) -> rtc.AudioFrame:
        n = np.arange(self._next, self._next + FRAME_SAMPLES)
        self._next += FRAME_SAMPLES
        samples = (TONE_AMPLITUDE * np.sin(2 * np.pi * self._hz * n / SAMPLE_RATE)).astype(np.int16)
        return rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, FRAME_SAMPLES)


@dataclass
class ToneMeter:
    """Counts received frames, and the ones that carry a tone with its pitch."""

    frames: int = 0
    tone_frames: int = 0
    first_tone_at: float = 0.0
    _crossings: int = 0
    _tone_samples: int = 0
    _sample_rate: int = SAMPLE_RATE

    def add(self, frame: rtc.AudioFrame) -> None:
        self.frames += 1
        samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
        if frame.num_channels > 1:
            samples = samples[:: frame.num_channels]
        if samples.size == 0 or float(np.sqrt(np.mean(samples**2))) < TONE_RMS_MIN:
            return
        self.tone_frames += 1
        if not self.first_tone_at:
            self.first_tone_at = time.time()
        negative = np.signbit(samples)
        self._crossings += int(np.count_nonzero(negative[1:] != negative[:-1]))
        self._tone_samples += samples.size
        self._sample_rate = frame.sample_rate

    @property
    def pitch_hz(self) -> float:
        """The tone's pitch from its zero crossings (two a period), 0 without tone frames."""
        if not self._tone_samples:
            return 0.0
        return self._crossings * self._sample_rate / (2 * self._tone_samples)

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "tone_frames": self.tone_frames,
            "pitch_hz": round(self.pitch_hz, 1),
            "first_tone_at": self.first_tone_at,
        }


async def speak(source: rtc.AudioSource, hz: float, max_s: float = MAX_SPEAK_S) -> None:
    """Push a tone into `source` for at most `max_s` (capture_frame paces it in real time)."""
    tone = Tone(hz)
    for _ in range(int(max_s * 1000 / FRAME_MS)):
        await source.capture_frame(tone.frame())


async def publish_voice(room: rtc.Room, name: str) -> rtc.AudioSource:
    """Publish a 48 kHz mono microphone track fed by the returned source."""
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track(name, source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    return source


async def remote_audio_track(room: rtc.Room, identity: str | None = None) -> rtc.RemoteAudioTrack:
    """The first subscribed audio track (of `identity`), waiting for one if needed."""
    found: asyncio.Future[rtc.RemoteAudioTrack] = asyncio.get_running_loop().create_future()

    def on_subscribed(
        track: rtc.Track, _: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant
    ) -> None:
        wanted = identity is None or p.identity == identity
        if wanted and isinstance(track, rtc.RemoteAudioTrack) and not found.done():
            found.set_result(track)

    room.on("track_subscribed", on_subscribed)
    try:
        for p in room.remote_participants.values():
            for pub in p.track_publications.values():
                if pub.track is not None:
                    on_subscribed(pub.track, pub, p)
        return await found
    finally:
        room.off("track_subscribed", on_subscribed)


async def listen(
    room: rtc.Room, meter: ToneMeter, identity: str | None = None, heard_event: str = ""
) -> None:
    """Feed `meter` with the remote audio (of `identity`); report `heard_event` (if given) when
    HEARD_TONE_FRAMES tone frames have arrived."""
    track = await remote_audio_track(room, identity)
    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
    reported = not heard_event
    try:
        async for event in stream:
            meter.add(event.frame)
            if not reported and meter.tone_frames >= HEARD_TONE_FRAMES:
                reported = True
                report(heard_event, **meter.summary())
    finally:
        await stream.aclose()


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    caller = await ctx.wait_for_participant()
    report(
        "caller",
        job_id=ctx.job.id,
        room=ctx.room_name,
        agent_identity=ctx.room.local_participant.identity,
        identity=caller.identity,
        kind=rtc.ParticipantKind.Name(caller.kind),
        attributes=dict(caller.attributes),
    )
    source = await publish_voice(ctx.room, "agent-voice")
    heard = ToneMeter()
    tasks = [
        asyncio.create_task(speak(source, AGENT_TONE_HZ)),
        asyncio.create_task(listen(ctx.room, heard, caller.identity, "heard")),
    ]

    async def on_shutdown(reason: str) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await source.aclose()
        heard_fields = {"participant": caller.identity, **heard.summary()}
        log.info("agent heard the caller", extra=heard_fields)
        report("shutdown", reason=reason, **heard.summary())

    ctx.add_shutdown_callback(on_shutdown)
