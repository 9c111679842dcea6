"""An AgentSession without a room: a caller that speaks into the session's audio input in real
time, and a recorder that plays the agent's audio out at real time and keeps it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from livekit import rtc
from livekit.agents.voice import io

from tests.plugins.support import in_frames, silence

FRAME_MS = 20
CALLER_RATE = 48000


class Caller(io.AudioInput):
    """20 ms frames at real-time pace: silence, or the next queued utterance."""

    def __init__(self) -> None:
        super().__init__(label="test caller")
        self._queued: list[rtc.AudioFrame] = []
        self._next_at: float | None = None
        self.finished_speaking = asyncio.Event()
        self.finished_speaking.set()
        self.speech_ended_at = 0.0

    def say(self, audio: rtc.AudioFrame) -> None:
        self._queued.extend(in_frames(audio, FRAME_MS))
        self.finished_speaking.clear()

    async def __anext__(self) -> rtc.AudioFrame:
        now = time.perf_counter()
        self._next_at = max(self._next_at or now, now - 0.2) + FRAME_MS / 1000
        await asyncio.sleep(max(0.0, self._next_at - now))
        if self._queued:
            frame = self._queued.pop(0)
            if not self._queued:
                self.speech_ended_at = time.perf_counter()
                self.finished_speaking.set()
            return frame
        return silence(FRAME_MS / 1000, CALLER_RATE)


@dataclass
class Segment:
    frames: list[rtc.AudioFrame] = field(default_factory=list)
    first_audio_at: float = 0.0

    def audio(self) -> rtc.AudioFrame:
        return rtc.combine_audio_frames(self.frames)


class Recorder(io.AudioOutput):
    """Keeps each reply's audio and reports it played after its real duration."""

    def __init__(self) -> None:
        super().__init__(
            label="test recorder",
            capabilities=io.AudioOutputCapabilities(pause=False),
            sample_rate=None,
        )
        self.segments: list[Segment] = []
        self._current: Segment | None = None
        self._playouts: set[asyncio.Task[None]] = set()
        self._played = 0
        self._changed = asyncio.Condition()

    async def wait_played(self, replies: int) -> None:
        """Until `replies` replies have been played out in full."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._played >= replies)

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._current is None:
            self._current = Segment(first_audio_at=time.perf_counter())
            self.segments.append(self._current)
            self.on_playback_started(created_at=time.time())
        self._current.frames.append(frame)

    def flush(self) -> None:
        super().flush()
        segment, self._current = self._current, None
        if segment is not None:
            task = asyncio.create_task(self._play(segment))
            self._playouts.add(task)
            task.add_done_callback(self._playouts.discard)

    def clear_buffer(self) -> None:
        if self._current is not None:
            self.flush()

    async def _play(self, segment: Segment) -> None:
        duration = sum(f.duration for f in segment.frames)
        await asyncio.sleep(max(0.0, segment.first_audio_at + duration - time.perf_counter()))
        self.on_playback_finished(playback_position=duration, interrupted=False)
        async with self._changed:
            self._played += 1
            self._changed.notify_all()
