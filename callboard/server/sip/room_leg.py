"""What a phone call needs from the room it joins (`room_media.py` is the implementation):
`CallRooms.join` puts the caller into the room its dispatch rule chose, creating the room and
dispatching the rule's agents; the leg carries the caller's audio and digits into the room and
mixes the room's audio for the phone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from callboard.server.sip.codecs import Pcm
from callboard.server.sip.rules import Dispatch

DigitSink = Callable[[str], None]
RemovedSink = Callable[[int], None]
"""Called with the DisconnectReason when the room ends the caller's membership."""


class RoomLeg(Protocol):
    """The caller's participant in the room."""

    @property
    def room_name(self) -> str: ...

    async def wait_subscribed(self, timeout: float) -> bool: ...

    def subscribers(self) -> list[str]:
        """Identities of the participants hearing the caller."""

    def set_attributes(self, attributes: Mapping[str, str]) -> None: ...

    def caller_audio(self, pcm: Pcm) -> None: ...

    def caller_digit(self, digit: str) -> None: ...

    def next_frame(self) -> Pcm | None:
        """20 ms of the room's audio for the phone, or None for silence."""

    async def leave(self, reason: int) -> None: ...


class CallRooms(Protocol):
    async def join(
        self, dispatch: Dispatch, digits_to_caller: DigitSink, removed: RemovedSink
    ) -> RoomLeg: ...
