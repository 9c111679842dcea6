"""A simulated phone caller for voice agents: joins a room the way LiveKit's SIP gateway puts a
caller in one, speaks scripted sentences (offline TTS) into a microphone track, listens to the
agent, and measures each turn at the caller's ear.

Shared by `callboard demo`, the closed-loop conversation tests and bench/voice.py, so the three
measure a turn the same way: from the caller's end of speech (the last sample of the sentence
leaving the caller's audio queue) to the first voiced 10 ms of the agent's audio reaching the
caller. The agent's own transcripts (what its STT heard, what it said) arrive on livekit-agents'
`lk.transcription` text streams. Needs the `voice` extra (hibari TTS, numpy).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import re
import secrets
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from livekit import api, rtc

from callboard.server.ids import BASE57

SAMPLE_RATE: Final = 48000
"""The microphone track's rate (Opus)."""
RECORD_RATE: Final = 16000
"""The ear's and the recording's rate: what Whisper reads."""
FRAME_MS: Final = 10
MIC_QUEUE_MS: Final = 100
"""A short send queue, so that a sentence starts within 0.1 s of being said."""
VOICED_RMS: Final = 300.0
"""10 ms of the agent's audio louder than this (int16 RMS) is speech; its silence is far below."""
END_OF_REPLY_SILENCE_S: Final = 1.0
"""The agent finished its reply once the caller has heard this much silence after its speech."""
REPLY_TIMEOUT_S: Final = 30.0
TRANSCRIPT_GRACE_S: Final = 5.0
"""How long the agent's final transcript may trail the end of its audio."""
TRANSCRIPTION_TOPIC: Final = "lk.transcription"
AGENT_SESSION_TOPIC: Final = "lk.agent.session"
"""livekit-agents' session events (its remote-session protocol): a phone has no use for them."""
TRANSCRIBED_TRACK: Final = "lk.transcribed_track_id"
TRANSCRIPTION_FINAL: Final = "lk.transcription_final"
SIP_TRUNK_NUMBER: Final = "+15105550100"
"""The called number: the clinic's line."""


def sip_room_name(caller: str) -> str:
    """A room name as LiveKit's SIP gateway makes it for an individual dispatch rule
    (`room_prefix` "call-")."""
    return f"call-_{caller}_" + "".join(secrets.choice(BASE57) for _ in range(12))


def sip_caller_token(api_key: str, api_secret: str, room: str, number: str) -> str:
    """A join token shaped like the one livekit-sip builds for an inbound caller: identity
    `sip_<number>`, kind SIP, the `sip.*` attributes, name "Phone <number>"."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_update_own_metadata=True,
    )
    call_id = "SCL_" + "".join(secrets.choice(BASE57) for _ in range(12))
    return (
        api.AccessToken(api_key, api_secret)
        .with_identity(f"sip_{number}")
        .with_name(f"Phone {number}")
        .with_kind("sip")
        .with_attributes(
            {
                "sip.callID": call_id,
                "sip.callStatus": "active",
                "sip.phoneNumber": number,
                "sip.trunkPhoneNumber": SIP_TRUNK_NUMBER,
                "sip.hostname": "localhost",
                "sip.trunkID": "ST_demo",
                "sip.ruleID": "SDR_demo",
            }
        )
        .with_grants(grants)
        .to_jwt()
    )


NUMBER_WORDS: Final = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve".split()  # noqa: SIM905
)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; small numbers spelled out, as a script says them
    and Whisper may write them in digits."""
    found = re.findall(r"[a-z0-9']+", text.lower().replace("’", "'"))
    return [
        NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in found
    ]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def rms(samples: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0


class Recording:
    """Both sides of a call on one timeline at RECORD_RATE: a stereo WAV, caller left."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._chunks: tuple[list[tuple[float, np.ndarray[Any, Any]]], ...] = ([], [])

    def put(self, channel: int, at: float, samples: np.ndarray[Any, Any]) -> None:
        """`samples` (int16 at RECORD_RATE) began playing at monotonic time `at`."""
        self._chunks[channel].append((at, samples))

    def save(self, path: Path) -> None:
        end = max((t + len(s) / RECORD_RATE for ch in self._chunks for t, s in ch), default=0.0)
        length = max(int((end - self.started) * RECORD_RATE), 1)
        out = np.zeros((length, 2), dtype=np.int16)
        for channel, chunks in enumerate(self._chunks):
            for at, samples in chunks:
                start = max(int((at - self.started) * RECORD_RATE), 0)
                part = samples[: max(length - start, 0)]
                out[start : start + len(part), channel] = part
        path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(RECORD_RATE)
            w.writeframes(out.tobytes())


class Ear:
    """The caller's speaker: the agent's audio with the time each 10 ms arrived. Each 10 ms is
    judged voiced or not once, on arrival, so that waiting for a reply costs the same at any
    point of a long call."""

    def __init__(self, recording: Recording) -> None:
        self.frames: list[tuple[float, np.ndarray[Any, Any]]] = []
        self.voiced: list[float] = []
        """Arrival times of the voiced 10 ms, in order."""
        self._recording = recording
        self.heard = asyncio.Event()

    async def listen(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(
            track, sample_rate=RECORD_RATE, num_channels=1, frame_size_ms=FRAME_MS
        )
        try:
            async for ev in stream:
                now = time.monotonic()
                samples = np.frombuffer(ev.frame.data, dtype=np.int16).copy()
                self.frames.append((now, samples))
                if rms(samples) > VOICED_RMS:
                    self.voiced.append(now)
                self._recording.put(1, now - len(samples) / RECORD_RATE, samples)
                self.heard.set()
                self.heard.clear()
        finally:
            await stream.aclose()

    def first_voiced_after(self, since: float) -> float | None:
        i = bisect.bisect_left(self.voiced, since)
        return self.voiced[i] if i < len(self.voiced) else None

    def reply_after(self, since: float) -> tuple[float, float] | None:
        """(first voiced, last voiced) of a reply that began after `since` and was followed by
        END_OF_REPLY_SILENCE_S of silence; None while the agent is silent or still speaking."""
        first = self.first_voiced_after(since)
        if first is None or time.monotonic() - self.voiced[-1] < END_OF_REPLY_SILENCE_S:
            return None
        return first, self.voiced[-1]

    def pcm(self, start: float, end: float) -> bytes:
        """What the caller heard from `start` to `end` (16 kHz int16), with a little margin."""
        chunks = [s for t, s in self.frames if start - 0.3 <= t <= end + 0.1]
        return np.concatenate(chunks).astype("<i2").tobytes() if chunks else b""


class Mouth:
    """The caller's microphone: silence in real time, or the sentence it was given."""

    def __init__(self, recording: Recording) -> None:
        self.source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=MIC_QUEUE_MS)
        self._recording = recording
        self._queued: deque[np.ndarray[Any, Any]] = deque()
        self._done: asyncio.Future[float] | None = None

    async def say(self, pcm: bytes, rate: int) -> float:
        """Speak `pcm` (int16 mono at `rate`); returns the monotonic time its last sample left
        the caller's queue: the caller's end of speech."""
        resampler = rtc.AudioResampler(rate, SAMPLE_RATE, num_channels=1)
        frames = resampler.push(bytearray(pcm)) + resampler.flush()
        data = np.frombuffer(rtc.combine_audio_frames(frames).data, dtype=np.int16)
        step = SAMPLE_RATE * FRAME_MS // 1000
        padded = np.pad(data, (0, -len(data) % step))
        self._queued.extend(padded[i : i + step] for i in range(0, len(padded), step))
        self._done = asyncio.get_running_loop().create_future()
        return await self._done

    async def run(self) -> None:
        step = SAMPLE_RATE * FRAME_MS // 1000
        silence = np.zeros(step, dtype=np.int16)
        while True:
            samples = self._queued.popleft() if self._queued else silence
            await self.source.capture_frame(rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, step))
            plays_at = time.monotonic() + self.source.queued_duration - FRAME_MS / 1000
            self._recording.put(0, plays_at, samples[:: SAMPLE_RATE // RECORD_RATE])
            if not self._queued and self._done is not None and samples is not silence:
                self._done.set_result(plays_at + FRAME_MS / 1000)
                self._done = None


@dataclass
class Turn:
    """One exchange: what the caller said, what the agent heard and answered, how fast."""

    said: str
    end_of_speech: float = 0.0
    heard_by_agent: str = ""
    agent_said: str = ""
    latency_s: float | None = None
    reply_pcm: bytes = b""


@dataclass
class CallEvent:
    """Something a person watching the call wants to see."""

    kind: str  # "joined", "says" (the caller), "caller" (as the agent heard it), "agent", "hangup"
    text: str = ""
    latency_s: float | None = None


class SipCaller:
    """One caller in one room: dial in, listen to the greeting, say each sentence and wait for
    the reply, hang up. `on_event` sees the call as it happens."""

    def __init__(
        self,
        ws_url: str,
        token: str,
        synthesize: Synthesize,
        on_event: Callable[[CallEvent], None] = lambda _: None,
    ) -> None:
        self.ws_url = ws_url
        self.token = token
        self.synthesize = synthesize
        self.on_event = on_event
        self.room = rtc.Room()
        self.recording = Recording()
        self.ear = Ear(self.recording)
        self.mouth = Mouth(self.recording)
        self._current: Turn | None = None
        self._agent_spoke = asyncio.Event()
        self.greeting = ""
        self.turns: list[Turn] = []
        self.mic_sid = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._agent_tracks: set[str] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def dial(self) -> None:
        def subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, *_: Any) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO and not self._agent_tracks:
                self._agent_tracks.add(pub.sid)
                self._spawn(self.ear.listen(track))

        self.room.on("track_subscribed", subscribed)
        self.room.register_text_stream_handler(TRANSCRIPTION_TOPIC, self._final_transcript)
        self.room.register_byte_stream_handler(AGENT_SESSION_TOPIC, self._discard)
        await self.room.connect(self.ws_url, self.token)
        pub = await self.room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("phone", self.mouth.source),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
        )
        self.mic_sid = pub.sid
        self._spawn(self.mouth.run())
        self.on_event(CallEvent("joined", self.room.name))

    async def _reply(self, since: float, timeout: float) -> tuple[float, float]:
        deadline = time.monotonic() + timeout
        while (found := self.ear.reply_after(since)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent did not answer within {timeout:.0f} s")
            await asyncio.sleep(0.05)
        return found

    def _discard(self, reader: rtc.ByteStreamReader, _identity: str) -> None:
        async def drain() -> None:
            with contextlib.suppress(rtc.StreamError):  # the call ended mid-stream
                async for _ in reader:
                    pass

        self._spawn(drain())

    def _final_transcript(self, reader: rtc.TextStreamReader, _identity: str) -> None:
        async def read() -> None:
            try:
                text = (await reader.read_all()).strip()
            except rtc.StreamError:  # the call ended mid-transcript
                return
            attrs = reader.info.attributes or {}
            if attrs.get(TRANSCRIPTION_FINAL) == "true" and text:
                self._on_final(attrs.get(TRANSCRIBED_TRACK, ""), text)

        self._spawn(read())

    def _on_final(self, track_sid: str, text: str) -> None:
        """A final transcript from the agent: of the caller's track (what its STT heard), or of
        its own speech (what it said)."""
        turn = self._current
        if track_sid == self.mic_sid:
            if turn is not None:
                turn.heard_by_agent = f"{turn.heard_by_agent} {text}".strip()
            self.on_event(CallEvent("caller", text))
            return
        if turn is None:
            self.greeting = f"{self.greeting} {text}".strip()
        else:
            turn.agent_said = f"{turn.agent_said} {text}".strip()
        self._agent_spoke.set()

    async def _agent_text(self, get: Callable[[], str]) -> None:
        """Wait briefly for the agent's final transcript, which may trail its audio."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TRANSCRIPT_GRACE_S):
                while not get():
                    self._agent_spoke.clear()
                    await self._agent_spoke.wait()

    async def listen_to_greeting(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        await self._reply(self.recording.started, timeout)
        await self._agent_text(lambda: self.greeting)
        self.on_event(CallEvent("agent", self.greeting))
        return self.greeting

    async def say(self, sentence: str, timeout: float = REPLY_TIMEOUT_S) -> Turn:
        """Say `sentence`, wait for the whole reply; the turn as the caller lived it."""
        turn = Turn(sentence)
        pcm, rate = await asyncio.to_thread(self.synthesize, sentence)
        self.on_event(CallEvent("says", sentence))
        turn.end_of_speech = await self.mouth.say(pcm, rate)
        self._current = turn
        first, last = await self._reply(turn.end_of_speech, timeout)
        turn.latency_s = first - turn.end_of_speech
        turn.reply_pcm = self.ear.pcm(first, last)
        await self._agent_text(lambda: turn.agent_said)
        self._current = None
        self.on_event(CallEvent("agent", turn.agent_said, turn.latency_s))
        self.turns.append(turn)
        return turn

    async def hang_up(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.room.disconnect()
        self.on_event(CallEvent("hangup"))


Synthesize = Callable[[str], tuple[bytes, int]]
"""A voice: a sentence in, (int16 mono PCM, its sample rate) out."""


def hibari_voice() -> Synthesize:
    """The caller's voice: the offline plugin's hibari (24 kHz). Call it on the main thread:
    the plugin registers its shared models when first imported, which it refuses off it."""
    from callboard.plugins.local import models

    voice = models.hibari_voice()

    def synthesize(sentence: str) -> tuple[bytes, int]:
        return voice.synthesize(sentence, 1.0), models.TTS_SAMPLE_RATE

    return synthesize
