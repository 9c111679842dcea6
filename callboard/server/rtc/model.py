"""The live room: who is in it, what they publish, who receives what.

Members are anything that implements `Member` (a WebRTC client behind /rtc, or a server-side
participant such as a phone call); the room never knows which. It keeps their
`ParticipantInfo`, tells members about each other (hidden ones stay invisible), routes data
packets with the sender's identity, and wires each published audio track to its subscribers
as `Frame` sinks, so audio crosses the room as encoded Opus without decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from livekit.protocol import models

from callboard.log import get_logger
from callboard.server.ids import new_id
from callboard.server.rtc.relay import OPUS_CLOCK_RATE, Frame, FrameSink
from callboard.server.rtc.speakers import AudioLevel, active_speakers, speaker_changes

log = get_logger("server.rtc.room")

PARTICIPANT_PREFIX = "PA_"
TRACK_PREFIX = "TR_"
OPUS_MIME = "audio/opus"


class Member(Protocol):
    """What the room asks of a participant's transport (WebRTC session or server-side)."""

    def on_participants(self, updates: list[models.ParticipantInfo]) -> None:
        """Others joined, changed or left (`state == DISCONNECTED`), as they should see them."""

    def on_data(self, packet: models.DataPacket, reliable: bool) -> None:
        """A data packet for this member, its sender's identity filled in."""

    def subscribe(self, publisher: models.ParticipantInfo, track: models.TrackInfo) -> FrameSink:
        """Start receiving `track`; the room pushes its frames into the returned sink."""

    def unsubscribe(self, track_sid: str) -> None:
        """Stop receiving `track_sid` (unpublished, its publisher left, or unsubscribed)."""

    def on_track_subscribed(self, track_sid: str) -> None:
        """This member's track `track_sid` got its first subscriber (livekit's TrackSubscribed,
        which livekit-agents waits for before speaking)."""

    def on_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        """Who started or stopped speaking, or speaks at a new level (livekit's SpeakersChanged)."""

    def on_room(self, info: models.Room) -> None:
        """The room's info changed (its metadata)."""

    def on_removed(self, reason: int) -> None:
        """The room ends this membership (RemoveParticipant, duplicate identity, room closed)."""


@dataclass(eq=False)
class Publication:
    """A published track and the sinks of its current subscribers (by subscriber sid)."""

    info: models.TrackInfo
    publisher: Participant
    sinks: dict[str, FrameSink] = field(default_factory=dict)
    audio_level: AudioLevel = field(default_factory=lambda: AudioLevel(OPUS_CLOCK_RATE))
    """Fed from the packets' audio level header extension, where the publisher sends it."""

    def push(self, frame: Frame) -> None:
        """One frame from the publisher to every subscriber."""
        if self.info.muted:
            return
        for sink in self.sinks.values():
            sink(frame)


@dataclass(eq=False)
class Participant:
    """A member and its state in one room."""

    info: models.ParticipantInfo
    member: Member
    auto_subscribe: bool = True
    publications: dict[str, Publication] = field(default_factory=dict)
    subscribed: set[str] = field(default_factory=set)
    """Track sids this participant receives."""
    unsubscribed: set[str] = field(default_factory=set)
    """Track sids this participant asked not to receive (wins over auto-subscribe)."""

    @property
    def sid(self) -> str:
        return str(self.info.sid)

    @property
    def identity(self) -> str:
        return str(self.info.identity)

    @property
    def hidden(self) -> bool:
        return bool(self.info.permission.hidden)

    @property
    def log_fields(self) -> dict[str, object]:
        return {"identity": self.identity, "participant_sid": self.sid}

    @property
    def takes_everything(self) -> bool:
        """Connected, auto-subscribing and allowed to subscribe: gets each new track."""
        return (
            self.auto_subscribe
            and self.info.permission.can_subscribe
            and self.info.state == models.ParticipantInfo.ACTIVE
        )

    def touch(self) -> None:
        self.info.version += 1


def participant_info(
    identity: str,
    name: str = "",
    metadata: str = "",
    attributes: dict[str, str] | None = None,
    kind: int = models.ParticipantInfo.STANDARD,
    permission: models.ParticipantPermission | None = None,
) -> models.ParticipantInfo:
    """A new participant's info, as the room shows it once it joined."""
    now = time.time()
    return models.ParticipantInfo(
        sid=new_id(PARTICIPANT_PREFIX),
        identity=identity,
        name=name,
        metadata=metadata,
        attributes=attributes or {},
        kind=kind,  # type: ignore[arg-type]
        state=models.ParticipantInfo.JOINED,
        joined_at=int(now),
        joined_at_ms=int(now * 1000),
        permission=permission
        or models.ParticipantPermission(
            can_subscribe=True, can_publish=True, can_publish_data=True
        ),
        version=1,
    )


class RoomHooks(Protocol):
    """What the server does when membership changes (dispatch, room closing)."""

    def participant_joined(self, room: LiveRoom, p: Participant) -> None: ...

    def first_publish(self, room: LiveRoom, p: Participant) -> None: ...

    def participant_left(self, room: LiveRoom, p: Participant) -> None: ...


class LiveRoom:
    """The participants of one room and the media and data between them."""

    def __init__(self, info: models.Room, hooks: RoomHooks) -> None:
        self.info = info
        self.participants: dict[str, Participant] = {}
        """By identity."""
        self.ever_joined = False
        self.last_left_at: float | None = None
        self.closed = False
        self._hooks = hooks
        self._published: set[str] = set()
        """Identities that published at least once (JT_PUBLISHER jobs start once)."""
        self._speakers: dict[str, float] = {}
        """Active speakers as members last heard of them: participant sid → level."""

    @property
    def name(self) -> str:
        return str(self.info.name)

    # -- membership ---------------------------------------------------------------------------

    def join(
        self, info: models.ParticipantInfo, member: Member, auto_subscribe: bool
    ) -> Participant:
        """Add a participant; an earlier one with the same identity is removed first."""
        old = self.participants.get(info.identity)
        if old is not None:
            self.remove(old, models.DUPLICATE_IDENTITY)
        p = Participant(info, member, auto_subscribe)
        self.participants[p.identity] = p
        self.ever_joined = True
        self.last_left_at = None
        self._sync_num_participants()
        log.info(
            "participant joined",
            extra={
                "room": self.name,
                **p.log_fields,
                "kind": models.ParticipantInfo.Kind.Name(info.kind),
            },
        )
        self.broadcast(p)
        self._hooks.participant_joined(self, p)
        return p

    def activate(self, p: Participant) -> None:
        """The participant's connection is up: subscribe it to what it may receive."""
        if p.info.state != models.ParticipantInfo.ACTIVE:
            p.info.state = models.ParticipantInfo.ACTIVE
            p.touch()
            self.broadcast(p)
        if p.auto_subscribe and p.info.permission.can_subscribe:
            for other in self.visible_to(p):
                for pub in other.publications.values():
                    self._subscribe(p, pub)

    def leave(self, p: Participant, reason: int) -> None:
        """`p` left (or was removed): others see it disconnected, its tracks go away."""
        if self.participants.get(p.identity) is not p:
            return
        del self.participants[p.identity]
        for sid in list(p.subscribed):
            self._unsubscribe_sid(p, sid)
        for pub in list(p.publications.values()):
            self._drop_publication(pub)
        p.info.state = models.ParticipantInfo.DISCONNECTED
        p.info.disconnect_reason = reason  # type: ignore[assignment]
        p.touch()
        self.last_left_at = time.time()
        self._sync_num_participants()
        log.info(
            "participant left",
            extra={
                "room": self.name,
                **p.log_fields,
                "reason": models.DisconnectReason.Name(reason),
            },
        )
        self.broadcast(p)
        self._hooks.participant_left(self, p)

    def remove(self, p: Participant, reason: int) -> None:
        """End `p`'s membership from the server side and tell its transport."""
        self.leave(p, reason)
        p.member.on_removed(reason)

    def close(self, reason: int) -> None:
        self.closed = True
        for p in list(self.participants.values()):
            self.remove(p, reason)

    def visible_to(self, viewer: Participant | None) -> list[Participant]:
        """The other participants `viewer` may see (hidden ones are invisible)."""
        return [p for p in self.participants.values() if p is not viewer and not p.hidden]

    def broadcast(self, p: Participant) -> None:
        """Tell every other member about `p`'s current info, unless `p` is hidden."""
        if p.hidden:
            return
        update = [p.info]
        for other in list(self.participants.values()):
            if other is not p:
                other.member.on_participants(update)

    def update(self, p: Participant) -> None:
        """`p`'s info changed (metadata, name, attributes, permission, mute)."""
        p.touch()
        self.broadcast(p)
        p.member.on_participants([p.info])

    def _sync_num_participants(self) -> None:
        self.info.num_participants = sum(1 for p in self.participants.values() if not p.hidden)

    # -- tracks -------------------------------------------------------------------------------

    def publish(self, p: Participant, track: models.TrackInfo) -> Publication:
        """Add `track` to `p`'s publications and wire it to its subscribers."""
        pub = Publication(track, p)
        p.publications[track.sid] = pub
        p.info.tracks.append(track)
        p.info.is_publisher = True
        p.touch()
        log.info(
            "track published",
            extra={
                "room": self.name,
                **p.log_fields,
                "track_sid": track.sid,
                "track_name": track.name,
            },
        )
        self.broadcast(p)
        if not p.hidden:
            for other in list(self.participants.values()):
                if other is not p and other.takes_everything:
                    self._subscribe(other, pub)
        if p.identity not in self._published:
            self._published.add(p.identity)
            self._hooks.first_publish(self, p)
        return pub

    def unpublish(self, p: Participant, track_sid: str) -> None:
        pub = p.publications.get(track_sid)
        if pub is None:
            return
        self._drop_publication(pub)
        p.touch()
        self.broadcast(p)

    def _drop_publication(self, pub: Publication) -> None:
        p = pub.publisher
        p.publications.pop(pub.info.sid, None)
        for i, t in enumerate(p.info.tracks):
            if t.sid == pub.info.sid:
                del p.info.tracks[i]
                break
        for other in list(self.participants.values()):
            if pub.info.sid in other.subscribed:
                self._unsubscribe_sid(other, pub.info.sid)

    def set_muted(self, p: Participant, track_sid: str, muted: bool) -> models.TrackInfo | None:
        pub = p.publications.get(track_sid)
        if pub is None:
            return None
        pub.info.muted = muted
        for t in p.info.tracks:
            if t.sid == track_sid:
                t.muted = muted
        self.update(p)
        return pub.info

    def find_publication(self, track_sid: str) -> Publication | None:
        for p in self.participants.values():
            pub = p.publications.get(track_sid)
            if pub is not None:
                return pub
        return None

    def set_subscribed(self, p: Participant, track_sids: Iterable[str], subscribe: bool) -> None:
        """UpdateSubscription: start or stop receiving tracks by sid."""
        for sid in track_sids:
            if subscribe:
                p.unsubscribed.discard(sid)
                pub = self.find_publication(sid)
                if pub is not None and pub.publisher is not p and not pub.publisher.hidden:
                    self._subscribe(p, pub, explicit=True)
            else:
                p.unsubscribed.add(sid)
                self._unsubscribe_sid(p, sid)

    def _subscribe(self, p: Participant, pub: Publication, explicit: bool = False) -> None:
        sid = pub.info.sid
        if sid in p.subscribed or (sid in p.unsubscribed and not explicit):
            return
        if not p.info.permission.can_subscribe:
            return
        first = not pub.sinks
        pub.sinks[p.sid] = p.member.subscribe(pub.publisher.info, pub.info)
        p.subscribed.add(sid)
        if first:
            pub.publisher.member.on_track_subscribed(sid)

    def _unsubscribe_sid(self, p: Participant, track_sid: str) -> None:
        if track_sid not in p.subscribed:
            return
        p.subscribed.discard(track_sid)
        pub = self.find_publication(track_sid)
        if pub is not None:
            pub.sinks.pop(p.sid, None)
        p.member.unsubscribe(track_sid)

    def set_metadata(self, metadata: str) -> None:
        """UpdateRoomMetadata: every member gets the room's new info."""
        self.info.metadata = metadata
        for p in list(self.participants.values()):
            p.member.on_room(self.info)

    def update_speakers(self, now: float) -> None:
        """Tell every member who started or stopped speaking since the last call (livekit-server
        does this every 400 ms)."""
        levels = [
            (p.sid, max((pub.audio_level.level(now) for pub in pubs), default=0.0))
            for p in self.participants.values()
            if not p.hidden and (pubs := [x for x in p.publications.values() if not x.info.muted])
        ]
        speakers = active_speakers(levels)
        changes = speaker_changes(self._speakers, speakers)
        self._speakers = speakers
        if changes:
            for p in list(self.participants.values()):
                p.member.on_speakers(changes)

    # -- data ---------------------------------------------------------------------------------

    def send_data(
        self, sender: Participant | None, packet: models.DataPacket, reliable: bool
    ) -> int:
        """Relay `packet` to its destination identities (all others when none); the sender's
        identity is set by the room, never taken from the packet. Returns the recipients."""
        if sender is not None:
            packet.participant_identity = sender.identity
            packet.participant_sid = sender.sid
            if packet.HasField("user"):
                packet.user.participant_identity = sender.identity
                packet.user.participant_sid = sender.sid
        wanted = set(packet.destination_identities)
        if packet.HasField("user") and packet.user.destination_identities:
            wanted |= set(packet.user.destination_identities)
        count = 0
        for p in list(self.participants.values()):
            if p is sender or (wanted and p.identity not in wanted):
                continue
            p.member.on_data(packet, reliable)
            count += 1
        return count
