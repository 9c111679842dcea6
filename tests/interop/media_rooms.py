"""Rooms with media, the same scenarios against either server, run by
tests/interop/test_media_rooms.py as `python -m tests.interop.media_rooms WORKDIR KIND`.

Like tests/interop/media_call.py the process first moves into a private network namespace, then
starts the server KIND and plays official rtc SDK participants against it: audio both ways
(levels measured), data and RPC, leaving, RemoveParticipant and the rest of the room model
through Twirp, hidden and SIP participants, and the jobs that follow participants (simulated
workers registered for JT_PARTICIPANT and JT_PUBLISHER). Each scenario records what it saw in
report.json (or its error); the test asserts on it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
from livekit import api, rtc
from livekit.protocol import agent

from callboard.simworker import SimWorker
from tests.interop.agents import media_agent
from tests.interop.call_process import against_server, call_script_main
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerProcess,
)
from tests.interop.media_call import base57
from tests.interop.support import wait_until

SCENARIO_TIMEOUT_S: Final = 60.0
EVENT_TIMEOUT_S: Final = 10.0
LISTEN_S: Final = 3.0
SETTLE_S: Final = 1.0
"""Audio measured after this much tone, once the receiver's jitter buffer settled."""
JOB_TIMEOUT_S: Final = 20.0
AGENT_LEFT_TIMEOUT_S: Final = 10.0
ROOM_CLOSE_TIMEOUT_S: Final = 8.0
"""Both servers close the room a second after its last participant left (departure_timeout 1,
checked every second here and by livekit-server)."""
PARTICIPANT_JOBS_AGENT: Final = "media-participant-jobs"
ENDS_ABANDONED_JOBS: Final = "callboard"
"""The server kind that ends the job of an agent that left and the jobs of a closed room:
livekit-server 1.13.5 ends neither (the test asserts them on callboard only), so its run
records None for both instead of idling through their timeouts."""


def room_name(prefix: str) -> str:
    return f"{prefix}-{base57(8)}"


def token(identity: str, room: str, kind: str = "", hidden: bool = False, **extra: Any) -> str:
    grants = api.VideoGrants(room_join=True, room=room, hidden=hidden, **extra)
    t = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(grants)
    if kind:
        t = t.with_kind(kind)  # type: ignore[arg-type]
    return t.to_jwt()


class LevelMeter:
    """RMS of received frames that carry the tone, after SETTLE_S of it."""

    def __init__(self) -> None:
        self.tone = media_agent.ToneMeter()
        self.levels: list[float] = []
        self._start = 0.0

    def add(self, frame: rtc.AudioFrame) -> None:
        self.tone.add(frame)
        if not self.tone.first_tone_at:
            return
        if not self._start:
            self._start = time.monotonic()
        if time.monotonic() - self._start >= SETTLE_S:
            samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
            self.levels.append(float(np.sqrt(np.mean(samples**2))))

    def summary(self) -> dict[str, Any]:
        level = float(np.median(self.levels)) if self.levels else 0.0
        return {**self.tone.summary(), "rms": round(level, 1), "measured_frames": len(self.levels)}


async def listen_levels(room: rtc.Room, identity: str, meter: LevelMeter) -> None:
    track = await media_agent.remote_audio_track(room, identity)
    stream = rtc.AudioStream(track, sample_rate=media_agent.SAMPLE_RATE, num_channels=1)
    try:
        async for event in stream:
            meter.add(event.frame)
    finally:
        await stream.aclose()


class Rooms:
    """The SDK participants of one scenario, disconnected at its end."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.rooms: list[rtc.Room] = []

    async def join(self, identity: str, room: str, **grants: Any) -> rtc.Room:
        r = rtc.Room()
        await r.connect(self.server.ws_url, token(identity, room, **grants))
        self.rooms.append(r)
        return r

    async def aclose(self) -> None:
        for r in self.rooms:
            if r.isconnected():
                await r.disconnect()


def event_future(room: rtc.Room, event: str, pick: Callable[..., Any]) -> asyncio.Future[Any]:
    """A future set with `pick(*args)` at the first `event` for which it is not None."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def handler(*args: Any) -> None:
        value = pick(*args)
        if value is not None and not fut.done():
            fut.set_result(value)

    room.on(event, handler)
    return fut


async def audio_both_ways(server: ServerProcess, lk: api.LiveKitAPI) -> dict[str, Any]:
    """Alice says 440 Hz, Bob 880 Hz; each measures the other's level and pitch."""
    name = room_name("audio")
    rooms = Rooms(server)
    try:
        alice = await rooms.join("alice", name)
        bob = await rooms.join("bob", name)
        speakers_seen: set[str] = set()
        alice.on(
            "active_speakers_changed",
            lambda speakers: speakers_seen.update(p.identity for p in speakers),
        )
        meters = {"alice": LevelMeter(), "bob": LevelMeter()}
        sources = [
            await media_agent.publish_voice(alice, "alice-mic"),
            await media_agent.publish_voice(bob, "bob-mic"),
        ]
        tasks = [
            asyncio.create_task(media_agent.speak(sources[0], media_agent.CALLER_TONE_HZ)),
            asyncio.create_task(media_agent.speak(sources[1], media_agent.AGENT_TONE_HZ)),
            asyncio.create_task(listen_levels(alice, "bob", meters["alice"])),
            asyncio.create_task(listen_levels(bob, "alice", meters["bob"])),
        ]
        await wait_until(
            lambda: all(len(m.levels) >= LISTEN_S * 100 for m in meters.values()),
            "both to hear a few seconds of tone",
            SCENARIO_TIMEOUT_S / 2,
            lambda: json.dumps({k: m.summary() for k, m in meters.items()}),
        )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        unpublished = event_future(bob, "track_unpublished", lambda pub, p: (p.identity, pub.sid))
        alice_track = next(iter(alice.local_participant.track_publications))
        await alice.local_participant.unpublish_track(alice_track)
        bob_saw_unpublished = await asyncio.wait_for(unpublished, EVENT_TIMEOUT_S)
        for s in sources:
            await s.aclose()
        sent_rms = media_agent.TONE_AMPLITUDE / np.sqrt(2)
        return {
            "sent_rms": round(float(sent_rms), 1),
            "alice_heard": meters["alice"].summary(),
            "bob_heard": meters["bob"].summary(),
            "alice_saw_speaking": sorted(speakers_seen),
            "unpublished": bob_saw_unpublished == ("alice", alice_track),
        }
    finally:
        await rooms.aclose()


async def data_and_rpc(server: ServerProcess, lk: api.LiveKitAPI) -> dict[str, Any]:
    """Reliable and lossy packets, a packet for one destination, an RPC round trip."""
    name = room_name("data")
    rooms = Rooms(server)
    try:
        alice = await rooms.join("alice", name)
        bob = await rooms.join("bob", name)
        carol = await rooms.join("carol", name)
        got: dict[str, list[dict[str, Any]]] = {"bob": [], "carol": []}
        for who, r in (("bob", bob), ("carol", carol)):
            r.on(
                "data_received",
                lambda d, who=who: got[who].append(
                    {
                        "data": d.data.decode(),
                        "from": d.participant.identity if d.participant else None,
                        "kind": rtc.DataPacketKind.Name(d.kind),
                        "topic": d.topic,
                    }
                ),
            )
        calls: list[dict[str, str]] = []

        @bob.local_participant.register_rpc_method("shout")
        async def shout(data: rtc.RpcInvocationData) -> str:
            calls.append({"caller": data.caller_identity, "payload": data.payload})
            return data.payload.upper()

        await wait_until(
            lambda: len(alice.remote_participants) == 2, "alice to see the others", EVENT_TIMEOUT_S
        )
        await alice.local_participant.publish_data(b"hello reliable", reliable=True, topic="t")
        # lossy packets may be lost: send a few until one arrives
        for _ in range(20):
            await alice.local_participant.publish_data(b"hello lossy", reliable=False)
            await asyncio.sleep(0.05)
            if any(p["data"] == "hello lossy" for p in got["bob"]):
                break
        await alice.local_participant.publish_data(
            b"only carol", reliable=True, destination_identities=["carol"]
        )
        answer = await alice.local_participant.perform_rpc(
            destination_identity="bob", method="shout", payload="hi bob", response_timeout=5.0
        )
        await wait_until(
            lambda: any(p["data"] == "only carol" for p in got["carol"]),
            "carol's packet",
            EVENT_TIMEOUT_S,
        )
        await asyncio.sleep(0.3)  # anything misrouted to bob would have arrived by now
        return {"bob_got": got["bob"], "carol_got": got["carol"], "rpc": calls, "answer": answer}
    finally:
        await rooms.aclose()


async def leave_and_remove(server: ServerProcess, lk: api.LiveKitAPI) -> dict[str, Any]:
    """Carol leaves (others see participant_disconnected); RemoveParticipant ends Bob's."""
    name = room_name("leave")
    rooms = Rooms(server)
    try:
        alice = await rooms.join("alice", name)
        bob = await rooms.join("bob", name)
        carol = await rooms.join("carol", name)
        await wait_until(
            lambda: {"bob", "carol"} <= set(alice.remote_participants),
            "alice to see bob and carol",
            EVENT_TIMEOUT_S,
        )
        left = event_future(
            alice,
            "participant_disconnected",
            lambda p: p.identity if p.identity == "carol" else None,
        )
        await carol.disconnect()
        left_identity = await asyncio.wait_for(left, EVENT_TIMEOUT_S)
        disconnected = event_future(bob, "disconnected", lambda reason: reason)
        bob_gone = event_future(
            alice, "participant_disconnected", lambda p: p.identity if p.identity == "bob" else None
        )
        await lk.room.remove_participant(api.RoomParticipantIdentity(room=name, identity="bob"))
        reason = await asyncio.wait_for(disconnected, EVENT_TIMEOUT_S)
        await asyncio.wait_for(bob_gone, EVENT_TIMEOUT_S)
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=name))
        return {
            "left": left_identity,
            "removed_reason": rtc.DisconnectReason.Name(reason),
            "remaining": sorted(p.identity for p in listed.participants),
        }
    finally:
        await rooms.aclose()


async def room_model(server: ServerProcess, lk: api.LiveKitAPI) -> dict[str, Any]:
    """Twirp on the live room: list, get, update, mute, send data; kinds; hidden agents."""
    name = room_name("model")
    rooms = Rooms(server)
    try:
        alice = await rooms.join("alice", name)
        await rooms.join("sip_+15550100", name, kind="sip")
        await rooms.join("watcher", name, kind="agent", hidden=True)
        source = await media_agent.publish_voice(alice, "alice-mic")
        speaking = asyncio.create_task(media_agent.speak(source, media_agent.CALLER_TONE_HZ, 10))
        await wait_until(
            lambda: "sip_+15550100" in alice.remote_participants,
            "alice to see the SIP caller",
            EVENT_TIMEOUT_S,
        )
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=name))

        async def alice_with_track() -> api.ParticipantInfo | None:
            identity = api.RoomParticipantIdentity(room=name, identity="alice")
            info = await lk.room.get_participant(identity)
            return info if info.tracks else None

        got = await wait_until(alice_with_track, "alice's track in GetParticipant", EVENT_TIMEOUT_S)
        changed = event_future(
            alice, "participant_metadata_changed", lambda p, old, new: new if p.identity else None
        )
        sip = alice.remote_participants["sip_+15550100"]
        sip_seen_kind = rtc.ParticipantKind.Name(sip.kind)
        bob = await rooms.join("bob", name)
        bob_changed = event_future(
            bob, "participant_metadata_changed", lambda p, old, new: (p.identity, new)
        )
        await lk.room.update_participant(
            api.UpdateParticipantRequest(room=name, identity="alice", metadata="on a call")
        )
        own_metadata = await asyncio.wait_for(changed, EVENT_TIMEOUT_S)
        bob_saw = await asyncio.wait_for(bob_changed, EVENT_TIMEOUT_S)
        await wait_until(
            lambda: any(
                p.track_publications
                for p in bob.remote_participants.values()
                if p.identity == "alice"
            ),
            "bob to see alice's track",
            EVENT_TIMEOUT_S,
        )
        track_sid = next(iter(bob.remote_participants["alice"].track_publications))
        muted = event_future(bob, "track_muted", lambda p, pub: pub.sid)
        await lk.room.mute_published_track(
            api.MuteRoomTrackRequest(room=name, identity="alice", track_sid=track_sid, muted=True)
        )
        muted_sid = await asyncio.wait_for(muted, EVENT_TIMEOUT_S)
        server_data = event_future(
            bob,
            "data_received",
            lambda d: {
                "data": d.data.decode(),
                "from": d.participant.identity if d.participant else None,
                "topic": d.topic,
            },
        )
        await lk.room.send_data(
            api.SendDataRequest(
                room=name, data=b"from the server", kind=api.DataPacket.RELIABLE, topic="srv"
            )
        )
        data = await asyncio.wait_for(server_data, EVENT_TIMEOUT_S)
        room_metadata = event_future(bob, "room_metadata_changed", lambda old, new: new)
        updated = await lk.room.update_room_metadata(
            api.UpdateRoomMetadataRequest(room=name, metadata="conference")
        )
        bob_saw_room = await asyncio.wait_for(room_metadata, EVENT_TIMEOUT_S)
        speaking.cancel()
        await asyncio.gather(speaking, return_exceptions=True)
        await source.aclose()
        return {
            "listed": sorted(
                (p.identity, api.ParticipantInfo.Kind.Name(p.kind), p.permission.hidden)
                for p in listed.participants
            ),
            "get": {"identity": got.identity, "sid_prefix": got.sid[:3], "tracks": len(got.tracks)},
            "watcher_seen": "watcher" in {*alice.remote_participants, *bob.remote_participants},
            "sip_kind": sip_seen_kind,
            "own_metadata": own_metadata,
            "bob_saw_metadata": list(bob_saw),
            "muted": muted_sid == track_sid,
            "server_data": data,
            "room_metadata": [updated.metadata, bob_saw_room],
        }
    finally:
        await rooms.aclose()


async def jobs_follow_participants(server: ServerProcess, lk: api.LiveKitAPI) -> dict[str, Any]:
    """JT_PARTICIPANT and JT_PUBLISHER jobs; the job's token; the agent leaving ends its job;
    the room closing after its departure timeout terminates the rest."""
    name = room_name("jobs")
    per_room = SimWorker(
        server.ws_url, API_KEY, API_SECRET, PARTICIPANT_JOBS_AGENT, agent.JT_ROOM, job_seconds=None
    )
    per_participant = SimWorker(
        server.ws_url,
        API_KEY,
        API_SECRET,
        PARTICIPANT_JOBS_AGENT,
        agent.JT_PARTICIPANT,
        job_seconds=None,
    )
    per_publisher = SimWorker(
        server.ws_url,
        API_KEY,
        API_SECRET,
        PARTICIPANT_JOBS_AGENT,
        agent.JT_PUBLISHER,
        job_seconds=None,
    )
    rooms = Rooms(server)
    try:
        for w in (per_room, per_participant, per_publisher):
            await w.start()
        await lk.room.create_room(
            api.CreateRoomRequest(
                name=name,
                departure_timeout=1,
                agents=[api.RoomAgentDispatch(agent_name=PARTICIPANT_JOBS_AGENT)],
            )
        )
        caller = await rooms.join("caller", name)
        p_job = await wait_until(
            lambda: next(iter(per_participant.jobs.values()), None),
            "a JT_PARTICIPANT job",
            JOB_TIMEOUT_S,
        )
        source = await media_agent.publish_voice(caller, "caller-mic")
        pub_job = await wait_until(
            lambda: next(iter(per_publisher.jobs.values()), None),
            "a JT_PUBLISHER job",
            JOB_TIMEOUT_S,
        )
        room_job = await wait_until(
            lambda: next(iter(per_room.jobs.values()), None), "a JT_ROOM job", JOB_TIMEOUT_S
        )
        claims = json.loads(base64.urlsafe_b64decode(room_job.token.split(".")[1] + "=="))
        agent_room = rtc.Room()
        await agent_room.connect(server.ws_url, room_job.token)
        agent_identity = agent_room.local_participant.identity
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=name))
        await agent_room.disconnect()
        agent_left_ended_job = await came_true(
            lambda: room_job.job.id in per_room.terminated,
            AGENT_LEFT_TIMEOUT_S,
            server.kind == ENDS_ABANDONED_JOBS,
        )
        await source.aclose()
        await caller.disconnect()
        left_at = time.monotonic()
        room_close_ended_jobs = await came_true(
            lambda: (
                {p_job.job.id, pub_job.job.id}
                <= {*per_participant.terminated, *per_publisher.terminated}
            ),
            ROOM_CLOSE_TIMEOUT_S,
            server.kind == ENDS_ABANDONED_JOBS,
        )

        async def room_gone() -> bool:
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
            return not listed.rooms

        room_closed = await came_true(
            room_gone, ROOM_CLOSE_TIMEOUT_S - (time.monotonic() - left_at)
        )
        return {
            "participant_job": {
                "type": agent.JobType.Name(p_job.job.type),
                "participant": p_job.job.participant.identity,
                "room": p_job.job.room.name,
            },
            "publisher_job": {
                "type": agent.JobType.Name(pub_job.job.type),
                "participant": pub_job.job.participant.identity,
            },
            "token_room": claims["video"]["room"],
            "agent_joined_as": agent_identity,
            "listed_with_agent": sorted(p.identity for p in listed.participants),
            "agent_left_ended_job": agent_left_ended_job,
            "room_closed": room_closed,
            "room_close_ended_jobs": room_close_ended_jobs,
        }
    finally:
        await rooms.aclose()
        for w in (per_room, per_participant, per_publisher):
            await w.aclose()


async def came_true(
    probe: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float, wait: bool = True
) -> bool | None:
    """Whether `probe` came true within `timeout` seconds; None when not `wait`ed for."""
    if not wait:
        return None
    try:
        return bool(await wait_until(probe, "", timeout))
    except AssertionError:
        return False


SCENARIOS: Final[
    dict[str, Callable[[ServerProcess, api.LiveKitAPI], Awaitable[dict[str, Any]]]]
] = {
    "audio": audio_both_ways,
    "data": data_and_rpc,
    "leave": leave_and_remove,
    "room_model": room_model,
    "jobs": jobs_follow_participants,
}


async def run_all(server: ServerProcess, report: dict[str, Any], only: list[str]) -> None:
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        for name, scenario in SCENARIOS.items():
            if only and name not in only:
                continue
            try:
                report[name] = await asyncio.wait_for(scenario(server, lk), SCENARIO_TIMEOUT_S)
            except BaseException as e:
                report[name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(),
                }


def main(argv: list[str]) -> int:
    workdir, kind, only = Path(argv[1]), argv[2], argv[3:]
    report: dict[str, Any] = {"kind": kind}

    def run() -> None:
        logging.basicConfig(level=logging.WARNING)

        async def all_cases(server: ServerProcess) -> None:
            await run_all(server, report, only)

        against_server(kind, workdir, report, all_cases, None)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
