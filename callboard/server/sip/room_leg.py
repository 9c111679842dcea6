"""What a phone call needs from the room it joins, and today's implementation of it.

`CallRooms.join` puts the caller into the room its dispatch rule chose (creating the room and
dispatching the rule's agents). The leg it returns carries the caller's audio and digits into
the room and the room's audio back. Until the embedded server carries room media, `DispatchRooms`
opens the room and its dispatches and keeps the caller's participant state (attributes, frames,
digits) on the leg without publishing media, and so answers at once instead of waiting for a
subscriber.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from livekit.protocol import room

from callboard.log import get_logger
from callboard.server.rooms import RoomRegistry
from callboard.server.sip.codecs import Pcm
from callboard.server.sip.rules import Dispatch

log = get_logger("server.sip.room")

AudioSink = Callable[[Pcm], None]
DigitSink = Callable[[str], None]


class RoomLeg(Protocol):
    """The caller's participant in the room."""

    async def wait_subscribed(self, timeout: float) -> bool: ...

    def set_attributes(self, attributes: Mapping[str, str]) -> None: ...

    def caller_audio(self, pcm: Pcm) -> None: ...

    def caller_digit(self, digit: str) -> None: ...

    async def leave(self, reason: int) -> None: ...


class CallRooms(Protocol):
    async def join(
        self, dispatch: Dispatch, to_caller: AudioSink, digits_to_caller: DigitSink
    ) -> RoomLeg: ...


@dataclass
class DispatchLeg:
    """The caller's state in a room without media: attributes, and what arrived from the phone."""

    room_name: str
    identity: str
    attributes: dict[str, str]
    frames: int = 0
    digits: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    """Every `sip.callStatus` the participant had, in order."""
    left: int | None = None

    async def wait_subscribed(self, timeout: float) -> bool:
        return True

    def set_attributes(self, attributes: Mapping[str, str]) -> None:
        self.attributes.update(attributes)
        if "sip.callStatus" in attributes:
            self.statuses.append(attributes["sip.callStatus"])
        log.info(
            "sip participant attributes",
            extra={"room": self.room_name, "identity": self.identity, **_status(attributes)},
        )

    def caller_audio(self, pcm: Pcm) -> None:
        self.frames += 1

    def caller_digit(self, digit: str) -> None:
        self.digits.append(digit)
        log.info("sip dtmf", extra={"room": self.room_name, "identity": self.identity})

    async def leave(self, reason: int) -> None:
        self.left = reason


def _status(attributes: Mapping[str, str]) -> dict[str, str]:
    status = attributes.get("sip.callStatus")
    return {"call_status": status} if status else {}


class DispatchRooms:
    """Opens the dispatch rule's room (with its agents) in the server's registry."""

    def __init__(self, rooms: RoomRegistry) -> None:
        self._rooms = rooms
        self.legs: list[DispatchLeg] = []

    async def join(
        self, dispatch: Dispatch, to_caller: AudioSink, digits_to_caller: DigitSink
    ) -> RoomLeg:
        req = room.CreateRoomRequest(name=dispatch.room_name)
        if dispatch.room_config is not None:
            config = dispatch.room_config
            req.agents.extend(config.agents)
            req.empty_timeout, req.departure_timeout = (
                config.empty_timeout,
                config.departure_timeout,
            )
            req.metadata = config.metadata
        self._rooms.ensure_room(req)
        leg = DispatchLeg(dispatch.room_name, dispatch.identity, {})
        leg.set_attributes(dispatch.attributes)
        self.legs.append(leg)
        return leg
