"""RTP packets (RFC 3550) and telephone-events (RFC 4733): parse what arrives, build what we send.
Anything that is not a well-formed RTP version 2 packet parses to None (dropped, never raised)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

RTP_VERSION: Final = 2
HEADER: Final = struct.Struct("!BBHII")
EVENT: Final = struct.Struct("!BBH")
MAX_SEQ: Final = 1 << 16
MAX_TIMESTAMP: Final = 1 << 32
DTMF_DIGITS: Final = "0123456789*#ABCD"
DTMF_VOLUME: Final = 10
END_BIT: Final = 0x80


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    def encode(self) -> bytes:
        first = RTP_VERSION << 6
        second = (END_BIT if self.marker else 0) | self.payload_type
        return HEADER.pack(first, second, self.sequence, self.timestamp, self.ssrc) + self.payload


def parse_rtp(data: bytes) -> RtpPacket | None:
    """An RTP packet, or None for anything else (RTCP, garbage, a truncated header)."""
    if len(data) < HEADER.size:
        return None
    first, second, sequence, timestamp, ssrc = HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        return None
    payload_type = second & 0x7F
    if 64 <= payload_type <= 95:  # RTCP packet types 200-223 collide here (RFC 5761)
        return None
    offset = HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension
        if len(data) < offset + 4:
            return None
        (length,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * length
    end = len(data)
    if first & 0x20:  # padding
        if end == 0 or data[-1] == 0 or data[-1] > end - offset:
            return None
        end -= data[-1]
    if offset > end:
        return None
    return RtpPacket(payload_type, sequence, timestamp, ssrc, data[offset:end], bool(second & 0x80))


@dataclass(frozen=True)
class DtmfEvent:
    """One RFC 4733 event payload."""

    code: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str:
        return DTMF_DIGITS[self.code] if self.code < len(DTMF_DIGITS) else ""

    def encode(self) -> bytes:
        return EVENT.pack(self.code, (END_BIT if self.end else 0) | self.volume, self.duration)


def parse_event(payload: bytes) -> DtmfEvent | None:
    if len(payload) < EVENT.size:
        return None
    code, flags, duration = EVENT.unpack_from(payload)
    if code >= len(DTMF_DIGITS):
        return None
    return DtmfEvent(code, bool(flags & END_BIT), flags & 0x3F, duration)


class DtmfReceiver:
    """Turns a stream of telephone-event packets into digits, once each: an event is one
    timestamp, reported at its first end packet (RFC 4733 §2.5.1.4 sends it three times).
    Packets that never end an event (sipp's filler on another payload type) report nothing."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def push(self, packet: RtpPacket) -> str | None:
        event = parse_event(packet.payload)
        if event is None or not event.end or packet.timestamp in self._seen:
            return None
        self._seen.add(packet.timestamp)
        if len(self._seen) > 64:
            self._seen = {packet.timestamp}
        return event.digit
