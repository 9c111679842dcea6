"""A phone call as a server-side member of the live room (no WebRTC hop): the caller's audio is
published as a track of Opus packets (encoded once, from its 8 kHz), the tracks it subscribes
to (the agent's Opus) are decoded, mixed and handed to the call at 8 kHz, DTMF goes both ways
as `SipDTMF` data packets, and the call is answered once someone in the room subscribes to the
caller (livekit-sip's `waitSubscribe`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Final

import av
import numpy as np
from livekit.protocol import models, room

from callboard.log import get_logger
from callboard.server.ids import new_id
from callboard.server.rooms import RoomRegistry
from callboard.server.rtc.model import TRACK_PREFIX, LiveRoom, Participant, participant_info
from callboard.server.rtc.relay import OPUS_CLOCK_RATE, Frame, FrameSink, opus_payload
from callboard.server.sip.codecs import FRAME_SAMPLES, SAMPLE_RATE, Pcm
from callboard.server.sip.room_leg import DigitSink, RemovedSink
from callboard.server.sip.rtp import DTMF_DIGITS
from callboard.server.sip.rules import Dispatch

log = get_logger("server.sip.room")

TRACK_NAME: Final = "phone"
MAX_BUFFERED_FRAMES: Final = 25
"""Per subscribed track, 500 ms of audio waiting for the phone; older frames are dropped."""
ROOM_TIME_BASE: Final = Fraction(1, OPUS_CLOCK_RATE)
PHONE_OPUS_BITRATE: Final = 32000
"""bit/s for the caller's 8 kHz speech (narrowband Opus; G.711 itself carries 64 kbit/s)."""
PHONE_OPUS_FRAME_MS: Final = 40
"""Two phone frames per Opus packet: half the packets (and wake-ups) to the agent's WebRTC for
~20 ms more delay; 60 ms saved more CPU but cost its turns ~80 ms (bench/README.md)."""
PHONE_OPUS_SAMPLES: Final = SAMPLE_RATE * PHONE_OPUS_FRAME_MS // 1000
PHONE_OPUS_COMPLEXITY: Final = 5
"""libopus's effort, 0..10 (10 by default): 5 costs ~20 % less CPU per frame."""


def _samples(frames: list[av.AudioFrame]) -> Pcm:
    parts = [f.to_ndarray().reshape(-1) for f in frames]
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, dtype=np.int16)


class AudioToRoom:
    """8 kHz phone frames → 40 ms Opus packets (pts in 1/48000 s), encoded once per call for all
    its subscribers, at the phone's rate: the room's usual path (48 kHz PCM, encoded per
    subscriber by aiortc's stereo 96 kbit/s encoder) cost a call's server about 1 % of a core
    more (bench/README.md, `sip --agent`)."""

    def __init__(self) -> None:
        self._encoder = av.CodecContext.create("libopus", "w")
        self._encoder.sample_rate = SAMPLE_RATE
        self._encoder.format = "s16"
        self._encoder.layout = "mono"
        self._encoder.bit_rate = PHONE_OPUS_BITRATE
        self._encoder.time_base = Fraction(1, SAMPLE_RATE)
        self._encoder.options = {
            "application": "voip",
            "frame_duration": str(PHONE_OPUS_FRAME_MS),
            "compression_level": str(PHONE_OPUS_COMPLEXITY),
        }
        self._pending = np.zeros(0, dtype=np.int16)
        self._pts = 0

    def packets(self, pcm: Pcm, wanted: bool = True) -> list[av.Packet[Any]]:
        """The packets `pcm` completes; with nobody listening (`wanted` false) none are encoded,
        but the room's clock still runs."""
        self._pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        out = []
        while len(self._pending) >= PHONE_OPUS_SAMPLES:
            chunk = self._pending[:PHONE_OPUS_SAMPLES]
            self._pending = self._pending[PHONE_OPUS_SAMPLES:]
            if wanted:
                frame = av.AudioFrame.from_ndarray(
                    chunk.reshape(1, -1), format="s16", layout="mono"
                )
                frame.sample_rate = SAMPLE_RATE
                for packet in self._encoder.encode(frame):
                    packet.pts, packet.time_base = self._pts, ROOM_TIME_BASE
                    out.append(packet)
            self._pts += PHONE_OPUS_SAMPLES * OPUS_CLOCK_RATE // SAMPLE_RATE
        return out


class AudioFromRoom:
    """One subscribed track (Opus packets, or PCM frames from another server-side member) →
    20 ms frames at 8 kHz, buffered for the mixer."""

    def __init__(self) -> None:
        self._decoder: Any = None
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.int16)
        self.frames: deque[Pcm] = deque(maxlen=MAX_BUFFERED_FRAMES)
        self.received = 0

    def push(self, frame: Frame) -> None:
        self.received += 1
        try:
            decoded = self._decode(frame)
        except av.FFmpegError as e:
            log.debug("undecodable room audio dropped", extra={"error": str(e)})
            return
        for audio in decoded:
            self._pending = np.concatenate(
                [self._pending, _samples(self._resampler.resample(audio))]
            )
        while len(self._pending) >= FRAME_SAMPLES:
            self.frames.append(self._pending[:FRAME_SAMPLES])
            self._pending = self._pending[FRAME_SAMPLES:]

    def _decode(self, frame: Frame) -> list[av.AudioFrame]:
        audio = opus_payload(frame)
        if isinstance(audio, av.AudioFrame):
            return [audio]
        if self._decoder is None:
            self._decoder = av.CodecContext.create("opus", "r")
        return list(self._decoder.decode(audio))


class SipMember:
    """The room's view of the caller: what it hears, the digits sent to it, its removal."""

    def __init__(self, digits_to_caller: DigitSink, removed: RemovedSink) -> None:
        self._digits_to_caller = digits_to_caller
        self._removed = removed
        self.tracks: dict[str, AudioFromRoom] = {}
        self.subscribed = asyncio.Event()

    def on_participants(self, updates: list[models.ParticipantInfo]) -> None:
        pass

    def on_data(self, packet: models.DataPacket, reliable: bool) -> None:
        if packet.HasField("sip_dtmf") and packet.sip_dtmf.digit:
            self._digits_to_caller(packet.sip_dtmf.digit)

    def subscribe(self, publisher: models.ParticipantInfo, track: models.TrackInfo) -> FrameSink:
        source = self.tracks[track.sid] = AudioFromRoom()
        log.info(
            "sip participant hears a track",
            extra={"publisher": publisher.identity, "track_sid": track.sid},
        )
        return source.push

    def unsubscribe(self, track_sid: str) -> None:
        source = self.tracks.pop(track_sid, None)
        if source is not None:
            log.info(
                "sip participant stops hearing a track",
                extra={"track_sid": track_sid, "frames": source.received},
            )

    def on_track_subscribed(self, track_sid: str) -> None:
        self.subscribed.set()

    def on_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        pass

    def on_room(self, info: models.Room) -> None:
        pass

    def on_removed(self, reason: int) -> None:
        self._removed(reason)

    def next_frame(self) -> Pcm | None:
        """20 ms for the phone: the subscribed tracks mixed, or None when all are silent."""
        ready = [t.frames.popleft() for t in self.tracks.values() if t.frames]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        mixed = np.sum([f.astype(np.int32) for f in ready], axis=0)
        clipped: Pcm = np.clip(mixed, -32768, 32767).astype(np.int16)
        return clipped


class RoomMediaLeg:
    """The caller's participant in a live room."""

    def __init__(self, live: LiveRoom, participant: Participant, member: SipMember) -> None:
        self.live = live
        self.participant = participant
        self.member = member
        self._to_room = AudioToRoom()
        track = models.TrackInfo(
            sid=new_id(TRACK_PREFIX),
            type=models.AUDIO,
            name=TRACK_NAME,
            source=models.TrackSource.MICROPHONE,
            mime_type="audio/opus",
        )
        self.publication = live.publish(participant, track)
        self.left: int | None = None

    @property
    def room_name(self) -> str:
        return self.live.name

    async def wait_subscribed(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.member.subscribed.wait(), timeout)
        return self.member.subscribed.is_set()

    def subscribers(self) -> list[str]:
        sids = self.publication.sinks.keys()
        return [p.identity for p in self.live.participants.values() if p.sid in sids]

    def set_attributes(self, attributes: Mapping[str, str]) -> None:
        self.participant.info.attributes.update(attributes)
        self.live.update(self.participant)

    def caller_audio(self, pcm: Pcm) -> None:
        for packet in self._to_room.packets(pcm, wanted=bool(self.publication.sinks)):
            self.publication.push(packet)

    def caller_digit(self, digit: str) -> None:
        code = DTMF_DIGITS.find(digit.upper())
        packet = models.DataPacket(sip_dtmf=models.SipDTMF(code=max(code, 0), digit=digit))
        packet.kind = models.DataPacket.RELIABLE
        self.live.send_data(self.participant, packet, reliable=True)

    def next_frame(self) -> Pcm | None:
        return self.member.next_frame()

    async def leave(self, reason: int) -> None:
        if self.left is None:
            self.left = reason
            self.live.leave(self.participant, reason)


class RoomMediaRooms:
    """Puts calls into the server's live rooms (the rule's room, created with its agents)."""

    def __init__(self, rooms: RoomRegistry) -> None:
        self._rooms = rooms

    async def join(
        self, dispatch: Dispatch, digits_to_caller: DigitSink, removed: RemovedSink
    ) -> RoomMediaLeg:
        req = room.CreateRoomRequest(name=dispatch.room_name)
        if dispatch.room_config is not None:
            config = dispatch.room_config
            req.agents.extend(config.agents)
            req.empty_timeout = config.empty_timeout
            req.departure_timeout = config.departure_timeout
            req.metadata = config.metadata
        self._rooms.ensure_room(req)
        live = self._rooms.live_room(dispatch.room_name)
        member = SipMember(digits_to_caller, removed)
        info = participant_info(
            dispatch.identity,
            name=dispatch.name,
            metadata=dispatch.metadata,
            attributes=dict(dispatch.attributes),
            kind=models.ParticipantInfo.SIP,
        )
        participant = live.join(info, member, auto_subscribe=True)
        live.activate(participant)
        return RoomMediaLeg(live, participant, member)
