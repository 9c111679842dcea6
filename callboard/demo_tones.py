"""The media-only call of `callboard demo`, for installs without the voice extra: the caller
says a 440 Hz tone, the agent (callboard's own JobContext in its job process, no livekit-agents)
answers with 880 Hz, and each side counts what it heard of the other (the agent tells the caller
over a data packet). The tone helpers also serve bench/media.py."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Final

import numpy as np
from livekit import rtc

from callboard.job.context import JobContext
from callboard.voice_caller import FRAME_MS, SAMPLE_RATE, rms

if TYPE_CHECKING:
    from callboard.demo import CallRecord, Screen

FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000
CALLER_TONE_HZ: Final = 440.0
AGENT_TONE_HZ: Final = 880.0
TONE_AMPLITUDE: Final = 0.3 * 32767
TONE_RMS_MIN: Final = 1000.0
"""A 10 ms frame louder than this carries the other side's tone (silence is far below)."""
HEARD_FRAMES: Final = 50
"""Half a second of the other side's tone: enough to say the call carries audio both ways."""
MAX_SPEAK_S: Final = 60.0
HEARD_TOPIC: Final = "demo.heard"
CALLER_SIDE: Final = "caller"
AGENT_SIDE: Final = "agent"


def tone_frame(hz: float, index: int) -> rtc.AudioFrame:
    """The `index`-th 10 ms frame of a continuous sine at `hz`."""
    t = np.arange(index * FRAME_SAMPLES, (index + 1) * FRAME_SAMPLES)
    samples = (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * t / SAMPLE_RATE)).astype(np.int16)
    return rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, FRAME_SAMPLES)


class Ear:
    """Counts the 10 ms frames of a remote audio track that carry a tone."""

    def __init__(self) -> None:
        self.frames = 0
        self.heard = asyncio.Event()

    async def listen(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        try:
            async for event in stream:
                if rms(np.frombuffer(event.frame.data, dtype=np.int16)) >= TONE_RMS_MIN:
                    self.frames += 1
                    if self.frames >= HEARD_FRAMES:
                        self.heard.set()
        finally:
            await stream.aclose()


async def speak(room: rtc.Room, name: str, hz: float) -> None:
    """Publish a microphone track and say a tone into it, in real time."""
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track(name, source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    try:
        for i in range(int(MAX_SPEAK_S * 1000 / FRAME_MS)):
            await source.capture_frame(tone_frame(hz, i))
    finally:
        await source.aclose()


def first_audio(room: rtc.Room) -> asyncio.Future[rtc.RemoteParticipant]:
    """Resolves with the first remote participant whose audio this room subscribes to; the
    track is then on its publications."""
    found: asyncio.Future[rtc.RemoteParticipant] = asyncio.get_running_loop().create_future()

    def subscribed(
        track: rtc.Track, _: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant
    ) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and not found.done():
            found.set_result(p)

    room.on("track_subscribed", subscribed)
    for p in room.remote_participants.values():
        for pub in p.track_publications.values():
            if pub.track is not None:
                subscribed(pub.track, pub, p)
    return found


def audio_track(p: rtc.RemoteParticipant) -> rtc.Track:
    return next(
        pub.track
        for pub in p.track_publications.values()
        if pub.track is not None and pub.track.kind == rtc.TrackKind.KIND_AUDIO
    )


async def answer_with_tone(ctx: JobContext) -> None:
    """The demo's agent without the voice extra, in its own job process: joins, answers the
    caller's tone with its own, and tells the caller how much of the caller it heard."""
    await ctx.connect()
    caller = await ctx.wait_for_participant()
    ear = Ear()
    tasks = [asyncio.create_task(speak(ctx.room, "agent-voice", AGENT_TONE_HZ))]
    heard_from = await first_audio(ctx.room)
    tasks.append(asyncio.create_task(ear.listen(audio_track(heard_from))))

    async def hung_up() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    ctx.add_shutdown_callback(hung_up)
    await ear.heard.wait()
    await ctx.room.local_participant.publish_data(
        json.dumps({"frames": ear.frames}),
        topic=HEARD_TOPIC,
        destination_identities=[caller.identity],
    )


async def tone_call(ws_url: str, token: str, record: CallRecord, screen: Screen) -> None:
    """One caller: dial in, say a tone until both sides heard each other, hang up. What each
    side heard lands in `record.heard`, in frames."""
    room = rtc.Room()
    ear = Ear()
    told: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def data(packet: rtc.DataPacket) -> None:
        if packet.topic == HEARD_TOPIC and not told.done():
            told.set_result(int(json.loads(packet.data)["frames"]))

    room.on("data_received", data)
    tasks: list[asyncio.Task[None]] = []
    try:
        await room.connect(ws_url, token)
        me = room.local_participant.identity
        screen.line(record.label, "phone", f"{me} dials in (room {record.room})")
        tasks.append(asyncio.create_task(speak(room, "caller-mic", CALLER_TONE_HZ)))
        screen.line(record.label, "caller", f"says a {CALLER_TONE_HZ:.0f} Hz tone")
        agent = await first_audio(room)
        screen.line(record.label, "agent", f"{agent.identity} answers with {AGENT_TONE_HZ:.0f} Hz")
        tasks.append(asyncio.create_task(ear.listen(audio_track(agent))))
        record.heard[AGENT_SIDE] = await told
        screen.line(
            record.label, "agent", f"heard the caller: {record.heard[AGENT_SIDE] * FRAME_MS} ms"
        )
        await ear.heard.wait()
        record.heard[CALLER_SIDE] = ear.frames
        screen.line(
            record.label, "caller", f"heard the agent: {record.heard[CALLER_SIDE] * FRAME_MS} ms"
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await room.disconnect()
        screen.line(record.label, "phone", "hangs up")


def tone_summary(records: list[CallRecord], screen: Screen, ended_ok: str) -> int:
    """Each call's counts and job outcome; 0 when every call carried tones both ways and its job
    ended `ended_ok`."""
    print("", file=screen.out)
    print("summary", file=screen.out)
    ok = True
    for r in records:
        agent, caller = r.heard.get(AGENT_SIDE, 0), r.heard.get(CALLER_SIDE, 0)
        good = not r.error and r.status == ended_ok and min(agent, caller) >= HEARD_FRAMES
        ok = ok and good
        line = (
            f"  {r.label}: agent heard the caller {agent * FRAME_MS} ms, caller heard the agent "
            f"{caller * FRAME_MS} ms, job {r.job_id or '-'} {r.status or 'no status'}"
        )
        if r.error or r.job_error:
            line += f" ({r.error or r.job_error})"
        print(line, file=screen.out)
    verdict = "passed" if ok else "FAILED"
    print(
        f"demo {verdict}: {len(records)} call(s) answered by job processes, tones both ways",
        file=screen.out,
    )
    return 0 if ok else 1
