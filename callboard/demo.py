"""`callboard demo`: the whole flow on one machine, nothing to install or configure.

Starts the embedded server on a free loopback port and a real worker (prewarmed job processes
forked from a zygote), places calls the way LiveKit's SIP gateway does (rooms named
`call-_<caller>_<random>`, created through RoomService with the official `livekit-api`
client, the caller joining as `sip_<number>` with kind SIP), and holds a conversation in each:
the caller says a 440 Hz tone, the agent (in its job process) answers with 880 Hz; each side
counts what it heard of the other (the agent tells the caller over a data packet). The caller
then hangs up and the demo reports each job's terminal status as the server recorded it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from livekit import api, rtc
from livekit.protocol import agent

from callboard.job.context import JobContext, JobExecutorType, JobRequest
from callboard.log import get_logger
from callboard.server.app import run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.ids import BASE57
from callboard.server.rtc.network import NO_MEDIA_ADDRESS, media_addresses
from callboard.worker.options import WorkerOptions
from callboard.worker.worker import Worker

log = get_logger("demo")

CALLER: Final = "+56975231235"
CALLER_IDENTITY: Final = f"sip_{CALLER}"
DEMO_TIMEOUT_S: Final = 60.0
ENDED = (agent.JS_SUCCESS, agent.JS_FAILED)
SAMPLE_RATE: Final = 48000
FRAME_SAMPLES: Final = SAMPLE_RATE // 100
CALLER_TONE_HZ: Final = 440.0
AGENT_TONE_HZ: Final = 880.0
TONE_AMPLITUDE: Final = 0.3 * 32767
TONE_RMS_MIN: Final = 1000.0
"""A 10 ms frame louder than this carries the other side's tone (silence is far below)."""
HEARD_FRAMES: Final = 50
"""Half a second of the other side's voice: enough to say the call carries audio both ways."""
MAX_SPEAK_S: Final = 30.0
HEARD_TOPIC: Final = "demo.heard"


def sip_room_name(caller: str) -> str:
    """A room name as LiveKit's SIP gateway makes it for an individual dispatch rule."""
    return f"call-_{caller}_" + "".join(secrets.choice(BASE57) for _ in range(12))


@dataclass
class Ear:
    """Counts the 10 ms frames of a remote audio track that carry a tone."""

    frames: int = 0
    heard: asyncio.Event = field(default_factory=asyncio.Event)

    async def listen(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        try:
            async for event in stream:
                samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float64)
                if samples.size and float(np.sqrt(np.mean(samples**2))) >= TONE_RMS_MIN:
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
    n = np.arange(FRAME_SAMPLES)
    try:
        for i in range(int(MAX_SPEAK_S * 100)):
            t = n + i * FRAME_SAMPLES
            samples = (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * t / SAMPLE_RATE)).astype(np.int16)
            frame = rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, FRAME_SAMPLES)
            await source.capture_frame(frame)
    finally:
        await source.aclose()


def audio_of(room: rtc.Room, identity: str) -> asyncio.Future[rtc.Track]:
    """The first audio track of `identity` this room subscribes to."""
    found: asyncio.Future[rtc.Track] = asyncio.get_running_loop().create_future()

    def subscribed(track: rtc.Track, _: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if p.identity == identity and track.kind == rtc.TrackKind.KIND_AUDIO and not found.done():
            found.set_result(track)

    room.on("track_subscribed", subscribed)
    for p in room.remote_participants.values():
        for pub in p.track_publications.values():
            if pub.track is not None:
                subscribed(pub.track, pub, p)  # type: ignore[arg-type]
    return found


async def answer_call(ctx: JobContext) -> None:
    """The demo agent, in its own job process: joins, answers the caller's voice with its own,
    and tells the caller how much of it it heard."""
    await ctx.connect()
    caller = await ctx.wait_for_participant()
    logging.getLogger("demo.agent").info(
        "answering call",
        extra={"room": ctx.room_name, "job_id": ctx.job.id, "caller": caller.identity},
    )
    ear = Ear()
    tasks = [asyncio.create_task(speak(ctx.room, "agent-voice", AGENT_TONE_HZ))]
    tasks.append(asyncio.create_task(ear.listen(await audio_of(ctx.room, caller.identity))))

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


async def accept_calls(req: JobRequest) -> None:
    await req.accept(identity=f"agent-{req.id}", name="Asistente de Voz")


@dataclass
class Call:
    """One call as the caller lived it."""

    room: str
    caller_heard: int = 0
    agent_heard: int = 0
    error: str = ""


def caller_token(room: str) -> str:
    grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True)
    return (
        api.AccessToken(DEV_API_KEY, DEV_API_SECRET)
        .with_identity(CALLER_IDENTITY)
        .with_name(CALLER)
        .with_kind("sip")
        .with_attributes({"sip.phoneNumber": CALLER, "sip.callStatus": "active"})
        .with_grants(grants)
        .to_jwt()
    )


async def place_call(ws_url: str, call: Call) -> None:
    """Dial in, talk until both sides heard each other, hang up."""
    room = rtc.Room()
    ear = Ear()
    told: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def data(packet: rtc.DataPacket) -> None:
        if packet.topic == HEARD_TOPIC and not told.done():
            told.set_result(int(json.loads(packet.data)["frames"]))

    room.on("data_received", data)
    tasks: list[asyncio.Task[None]] = []
    try:
        await room.connect(ws_url, caller_token(call.room))
        tasks.append(asyncio.create_task(speak(room, "caller-mic", CALLER_TONE_HZ)))
        agent_voice = await audio_of(room, f"agent-{(await _agent_job_id(room))}")
        tasks.append(asyncio.create_task(ear.listen(agent_voice)))
        call.agent_heard = await told
        await ear.heard.wait()
        call.caller_heard = ear.frames
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await room.disconnect()


async def _agent_job_id(room: rtc.Room) -> str:
    """The job id of the agent that joined `room` (its identity is `agent-<job id>`)."""
    joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def check(p: rtc.RemoteParticipant) -> None:
        if p.identity.startswith("agent-") and not joined.done():
            joined.set_result(p.identity.removeprefix("agent-"))

    room.on("participant_connected", check)
    for p in room.remote_participants.values():
        check(p)
    return await joined


async def run_demo(calls: int) -> int:
    if not media_addresses():
        print(f"demo FAILED: {NO_MEDIA_ADDRESS}", file=sys.stdout)
        return 1
    async with run_server(ServerConfig(port=0)) as server:
        worker = Worker(
            WorkerOptions(
                entrypoint_fnc=answer_call,
                request_fnc=accept_calls,
                job_executor_type=JobExecutorType.PROCESS,
                ws_url=server.url,
                api_key=DEV_API_KEY,
                api_secret=DEV_API_SECRET,
                num_idle_processes=2,
                host="127.0.0.1",
                port=0,
            ),
            devmode=True,
        )
        running = asyncio.create_task(worker.run())
        try:
            placed, statuses = await _place_calls(server.url, server.http_url, worker, calls)
        finally:
            await worker.drain(10)
            await worker.aclose()
            await running
    return _report(placed, statuses)


async def _place_calls(
    ws_url: str, http_url: str, worker: Worker, calls: int
) -> tuple[list[Call], dict[str, agent.JobState]]:
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while not worker.registered:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not register with the embedded server")
        await asyncio.sleep(0.05)
    placed = [Call(sip_room_name(CALLER)) for _ in range(calls)]
    async with api.LiveKitAPI(http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
        await asyncio.gather(
            *(lk.room.create_room(api.CreateRoomRequest(name=c.room)) for c in placed)
        )
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(place_call(ws_url, c), DEMO_TIMEOUT_S) for c in placed),
            return_exceptions=True,
        )
        for call, outcome in zip(placed, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                call.error = f"{type(outcome).__name__}: {outcome}"
        states: dict[str, agent.JobState] = {}
        while time.monotonic() < deadline and len(states) < len(placed):
            for call in placed:
                for d in await lk.agent_dispatch.list_dispatch(call.room):
                    for job in d.state.jobs:
                        if job.state.status in ENDED:
                            states[call.room] = job.state
            await asyncio.sleep(0.1)
    return placed, states


def _report(placed: list[Call], states: dict[str, agent.JobState]) -> int:
    ok = True
    for call in placed:
        state = states.get(call.room)
        status = agent.JobStatus.Name(state.status) if state else "no outcome"
        took = (state.ended_at - state.started_at) / 1e9 if state and state.ended_at else 0.0
        heard = call.agent_heard >= HEARD_FRAMES and call.caller_heard >= HEARD_FRAMES
        ok = ok and heard and not call.error and bool(state) and status == "JS_SUCCESS"
        line = f"{call.room}: {status} in {took:.2f}s"
        if call.error:
            line += f" ({call.error})"
        else:
            line += (
                f", agent heard the caller {call.agent_heard * 10} ms,"
                f" caller heard the agent {call.caller_heard * 10} ms"
            )
        if state and state.error:
            line += f" ({state.error})"
        print(line, file=sys.stdout)
    verdict = "passed" if ok else "FAILED"
    print(
        f"demo {verdict}: {len(placed)} call(s) answered by job processes, audio both ways",
        file=sys.stdout,
    )
    return 0 if ok else 1
