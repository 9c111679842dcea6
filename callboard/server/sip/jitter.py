"""A small jitter buffer for one RTP stream: holds the first few packets, then hands packets out
in sequence order as soon as they are contiguous, waits up to `depth` packets past a gap, drops
duplicates and late arrivals, and says where a packet is missing."""

from __future__ import annotations

from typing import Final

from callboard.server.sip.rtp import MAX_SEQ, RtpPacket

DEFAULT_DEPTH: Final = 3
"""Packets held before the oldest is released (3 × 20 ms = 60 ms)."""
MAX_DEPTH: Final = 50
RESYNC_GAP: Final = 1000
"""A jump this large in sequence numbers is a new stream (a restart), not loss."""


def _ahead(a: int, b: int) -> int:
    """How far sequence number `a` is after `b`, modulo 2**16 (negative when before)."""
    d = (a - b) % MAX_SEQ
    return d - MAX_SEQ if d >= MAX_SEQ // 2 else d


class JitterBuffer:
    """Push packets as they arrive; pop them in order. A gap yields None (one lost frame)."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self.depth = depth
        self._packets: dict[int, RtpPacket] = {}
        self._next: int | None = None
        self._started = False
        self.lost = 0
        self.late = 0

    def push(self, packet: RtpPacket) -> None:
        if self._next is not None:
            ahead = _ahead(packet.sequence, self._next)
            if abs(ahead) > RESYNC_GAP:
                self._packets.clear()
                self._next = packet.sequence
            elif ahead < 0 and not self._started:
                self._next = packet.sequence  # still filling: an earlier packet starts the stream
            elif ahead < 0:
                self.late += 1
                return
        else:
            self._next = packet.sequence
        self._packets.setdefault(packet.sequence, packet)
        while len(self._packets) > MAX_DEPTH:
            self._skip()

    def _skip(self) -> None:
        assert self._next is not None
        self._packets.pop(self._next, None)
        self._next = (self._next + 1) % MAX_SEQ
        self.lost += 1

    def pop(self) -> list[RtpPacket | None]:
        """What is ready: packets in order, None for each one given up on as lost."""
        out: list[RtpPacket | None] = []
        if not self._started and len(self._packets) < self.depth:
            return out  # the first packets wait for `depth` to sort out early reordering
        self._started = True
        while self._next is not None and self._packets:
            packet = self._packets.pop(self._next, None)
            if packet is None:
                if len(self._packets) < self.depth:
                    break
                out.append(None)
                self.lost += 1
            else:
                out.append(packet)
            self._next = (self._next + 1) % MAX_SEQ
        return out
