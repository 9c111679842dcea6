"""A server-side member standing in for the agent in the SIP tests (and bench/sip.py): it joins
every room where a phone participant appears, subscribes to it (which is what makes the gateway
answer), keeps what it sees of the caller, and can talk back (a tone, or an echo of the caller)
and send DTMF."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

import av
import numpy as np
from livekit.protocol import models, room

from callboard.server.app import EmbeddedServer
from callboard.server.auth import Grants
from callboard.server.ids import new_id
from callboard.server.rtc.model import (
    TRACK_PREFIX,
    LiveRoom,
    Participant,
    Publication,
    participant_info,
)
from callboard.server.rtc.relay import OPUS_CLOCK_RATE as ROOM_RATE
from callboard.server.rtc.relay import Frame, FrameSink, opus_payload

AGENT: Final = "agent"
SCAN_S: Final = 0.01
LIST_ROOMS: Final = Grants("devkey", "", {"roomList": True})


@dataclass
class CallSeen:
    """One phone participant as the agent saw it."""

    identity: str
    room: str
    info: models.ParticipantInfo
    statuses: list[str] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)

    def see(self, info: models.ParticipantInfo) -> None:
        self.info = info
        status = info.attributes.get("sip.callStatus")
        if status and (not self.statuses or self.statuses[-1] != status):
            self.statuses.append(status)

    @property
    def left(self) -> bool:
        return self.info.state == models.ParticipantInfo.DISCONNECTED

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, dtype=np.int16)


class AgentMember:
    """The agent's membership in one room; with `echo`, it says back what the phone says."""

    def __init__(self, calls: dict[str, CallSeen], live: LiveRoom, echo: bool = False) -> None:
        self._calls = calls
        self.live = live
        self.echo = echo
        self.participant: Participant | None = None
        self.echo_publication: Publication | None = None

    def on_participants(self, updates: list[models.ParticipantInfo]) -> None:
        for info in updates:
            if info.kind == models.ParticipantInfo.SIP:
                self._call(info).see(_copy(info))

    def _call(self, info: models.ParticipantInfo) -> CallSeen:
        seen = self._calls.get(info.identity)
        if seen is None:
            seen = self._calls[info.identity] = CallSeen(info.identity, self.live.name, info)
        return seen

    def on_data(self, packet: models.DataPacket, reliable: bool) -> None:
        if packet.HasField("sip_dtmf"):
            self._calls[packet.participant_identity].digits.append(packet.sip_dtmf.digit)

    def subscribe(self, publisher: models.ParticipantInfo, track: models.TrackInfo) -> FrameSink:
        seen = self._call(publisher)
        if self.echo:
            return self._echo_sink()

        decoder = av.CodecContext.create("opus", "r")
        to_s16 = av.AudioResampler(format="s16", layout="mono", rate=ROOM_RATE)

        def sink(frame: Frame) -> None:
            audio = opus_payload(frame)
            decoded = [audio] if isinstance(audio, av.AudioFrame) else decoder.decode(audio)
            for pcm in decoded:
                for s16 in to_s16.resample(pcm):
                    seen.samples.append(s16.to_ndarray().reshape(-1).astype(np.int16))

        return sink

    def _echo_sink(self) -> FrameSink:
        def echo(frame: Frame) -> None:
            if self.echo_publication is None and self.participant is not None:
                track = models.TrackInfo(
                    sid=new_id(TRACK_PREFIX), type=models.AUDIO, name="echo", mime_type="audio/opus"
                )
                self.echo_publication = self.live.publish(self.participant, track)
            if self.echo_publication is not None:
                self.echo_publication.push(frame)

        return echo

    def unsubscribe(self, track_sid: str) -> None:
        pass

    def on_track_subscribed(self, track_sid: str) -> None:
        pass

    def on_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        pass

    def on_room(self, info: models.Room) -> None:
        pass

    def on_removed(self, reason: int) -> None:
        pass


def _copy(info: models.ParticipantInfo) -> models.ParticipantInfo:
    out = models.ParticipantInfo()
    out.CopyFrom(info)
    return out


class RoomAgent:
    """Joins every room that has a phone participant; `calls` by the phone's identity."""

    def __init__(self, server: EmbeddedServer, echo: bool = False) -> None:
        self.server = server
        self.echo = echo
        self.calls: dict[str, CallSeen] = {}
        self.members: dict[str, AgentMember] = {}

    async def _scan_task(self) -> None:
        while True:
            listed = await self.server.rooms.list_rooms(LIST_ROOMS, room.ListRoomsRequest())
            for info in listed.rooms:
                if info.name not in self.members:
                    self._join_if_called(self.server.rooms.live_room(info.name))
            await asyncio.sleep(SCAN_S)

    def _join_if_called(self, live: LiveRoom) -> None:
        phones = [
            p for p in live.participants.values() if p.info.kind == models.ParticipantInfo.SIP
        ]
        if not phones:
            return
        member = self.members[live.name] = AgentMember(self.calls, live, self.echo)
        member.on_participants([p.info for p in phones])
        kind = models.ParticipantInfo.AGENT
        member.participant = live.join(participant_info(AGENT, kind=kind), member, True)
        live.activate(member.participant)

    def member(self, identity: str) -> AgentMember:
        return self.members[self.calls[identity].room]

    async def say_tone(self, identity: str, seconds: float, hz: float = 440.0) -> None:
        """Publish a tone into the phone's room, paced in 20 ms frames."""
        member = self.member(identity)
        assert member.participant is not None
        track = models.TrackInfo(
            sid=new_id(TRACK_PREFIX), type=models.AUDIO, name="voice", mime_type="audio/opus"
        )
        pub = member.live.publish(member.participant, track)
        t = np.arange(int(48000 * seconds)) / 48000
        tone = (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
        for i, start in enumerate(range(0, len(tone) - 959, 960)):
            frame = av.AudioFrame.from_ndarray(
                tone[start : start + 960].reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, Fraction(1, 48000)
            pub.push(frame)
            await asyncio.sleep(0.02)

    def send_digit(self, identity: str, digit: str) -> None:
        member = self.member(identity)
        packet = models.DataPacket(
            sip_dtmf=models.SipDTMF(code="0123456789*#".index(digit), digit=digit),
            destination_identities=[identity],
        )
        member.live.send_data(member.participant, packet, reliable=True)


@contextlib.asynccontextmanager
async def room_agent(server: EmbeddedServer, echo: bool = False) -> AsyncIterator[RoomAgent]:
    agent = RoomAgent(server, echo)
    task = asyncio.get_running_loop().create_task(agent._scan_task())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
