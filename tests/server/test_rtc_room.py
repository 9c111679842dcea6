"""The live room with server-side members (as the SIP gateway attaches phone calls): they join,
publish Opus packets and receive the tracks they subscribe to, with no WebRTC in between; the
RoomService sees them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from fractions import Fraction

import av
import pytest
from livekit import api
from livekit.protocol import models

from callboard.server import rooms
from callboard.server.app import EmbeddedServer
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET
from callboard.server.ids import new_id
from callboard.server.rtc.model import TRACK_PREFIX, participant_info
from callboard.server.rtc.relay import Frame, FrameSink
from callboard.simworker import SimWorker
from tests.server.support import wait_until


@dataclass
class Phone:
    """A server-side member that keeps what the room tells it."""

    frames: dict[str, list[Frame]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    data: list[models.DataPacket] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    def on_participants(self, updates: list[models.ParticipantInfo]) -> None:
        for p in updates:
            self.seen[p.identity] = p.state

    def on_data(self, packet: models.DataPacket, reliable: bool) -> None:
        self.data.append(packet)

    def subscribe(self, publisher: models.ParticipantInfo, track: models.TrackInfo) -> FrameSink:
        received = self.frames.setdefault(track.sid, [])
        return received.append

    def unsubscribe(self, track_sid: str) -> None:
        self.frames.pop(track_sid, None)

    def on_track_subscribed(self, track_sid: str) -> None:
        pass

    def on_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        pass

    def on_room(self, info: models.Room) -> None:
        pass

    def on_removed(self, reason: int) -> None:
        self.removed.append(reason)


def opus_packet(payload: bytes, pts: int) -> av.Packet:
    packet = av.Packet(payload)
    packet.pts = pts
    packet.time_base = Fraction(1, 48000)
    return packet


def audio_track(name: str) -> models.TrackInfo:
    return models.TrackInfo(
        sid=new_id(TRACK_PREFIX),
        type=models.AUDIO,
        name=name,
        source=models.TrackSource.MICROPHONE,
        mime_type="audio/opus",
    )


async def test_server_side_members_exchange_audio_and_data(server: EmbeddedServer) -> None:
    room = server.rooms.live_room("call-_+15550100_x")
    caller, agent = Phone(), Phone()
    sip = models.ParticipantInfo.SIP
    p_caller = room.join(participant_info("sip_+15550100", kind=sip), caller, True)
    room.activate(p_caller)
    p_agent = room.join(participant_info("agent-1"), agent, True)
    room.activate(p_agent)

    pub = room.publish(p_caller, audio_track("phone"))
    for i in range(3):
        pub.push(opus_packet(bytes([i]) * 10, i * 960))
    (received,) = agent.frames.values()
    assert [bytes(f) for f in received] == [bytes([i]) * 10 for i in range(3)]
    assert caller.frames == {}  # nobody hears themselves

    room.send_data(p_caller, models.DataPacket(sip_dtmf=models.SipDTMF(code=1, digit="1")), True)
    (dtmf,) = agent.data
    assert (dtmf.participant_identity, dtmf.sip_dtmf.digit) == ("sip_+15550100", "1")

    async with api.LiveKitAPI(server.http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room.name))
        kinds = {p.identity: api.ParticipantInfo.Kind.Name(p.kind) for p in listed.participants}
        assert kinds == {"sip_+15550100": "SIP", "agent-1": "STANDARD"}
        await lk.room.mute_published_track(
            api.MuteRoomTrackRequest(
                room=room.name, identity="sip_+15550100", track_sid=pub.info.sid, muted=True
            )
        )
        pub.push(opus_packet(b"muted", 4 * 960))
        assert len(received) == 3  # a muted track is not forwarded
        await lk.room.remove_participant(
            api.RoomParticipantIdentity(room=room.name, identity="sip_+15550100")
        )
    assert caller.removed == [models.PARTICIPANT_REMOVED]
    assert agent.seen["sip_+15550100"] == models.ParticipantInfo.DISCONNECTED
    assert agent.frames == {}  # the track went with its publisher


async def test_a_hidden_member_is_invisible_to_the_others(server: EmbeddedServer) -> None:
    room = server.rooms.live_room("hidden")
    a, watcher = Phone(), Phone()
    room.join(participant_info("a"), a, True)
    hidden = models.ParticipantPermission(can_subscribe=True, hidden=True)
    room.join(participant_info("watcher", permission=hidden), watcher, True)
    assert "watcher" not in a.seen
    assert [p.identity for p in room.visible_to(None)] == ["a"]


async def test_an_agent_replaced_by_its_own_rejoin_keeps_its_job_and_one_gone_ends_it(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """livekit-server ends a job when its agent's participant leaves the room, but not when a
    new session of the same identity replaced it (room.go skips a replaced session): that is
    the rtc SDK's full reconnect, e.g. after a lost connection on a starved machine."""
    monkeypatch.setattr(rooms, "AGENT_LEFT_GRACE_S", 0.2)
    sim = SimWorker(
        server.url, DEV_API_KEY, DEV_API_SECRET, agent_name="rejoining", job_seconds=None
    )
    await sim.start()
    try:
        async with api.LiveKitAPI(server.http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
            for room_name in ("replaced", "gone"):
                await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name="rejoining", room=room_name)
                )
            await wait_until(lambda: len(sim.jobs) == 2, "both jobs assigned")
        by_room = {j.job.room.name: j.job for j in sim.jobs.values()}
        for room_name, job in by_room.items():
            live = server.rooms.live_room(room_name)
            info = participant_info(f"sim-{job.id}", kind=models.ParticipantInfo.AGENT)
            first = live.join(info, Phone(), True)
            if room_name == "replaced":
                live.join(participant_info(f"sim-{job.id}", kind=info.kind), Phone(), True)
            else:
                live.leave(first, models.CLIENT_INITIATED)
        gone = by_room["gone"].id
        await wait_until(lambda: gone in sim.terminated, "the job whose agent left to end")
        await asyncio.sleep(0.3)
        assert by_room["replaced"].id not in sim.terminated
    finally:
        await sim.aclose()
