"""Audio relayed as encoded Opus: taken from aiortc before its decoder, fed to its senders as
pre-encoded packets. Transcoding costs ~8 % of a core per track; relaying costs a copy.

Two hooks, both on aiortc 1.16.0 (pinned in pyproject.toml):
- receive: `RTCDtlsTransport` hands each RTP packet to `receiver._handle_rtp_packet(packet,
  arrival_time_ms)`; `tap_receiver` replaces that method on one receiver instance, so packets
  skip the jitter buffer (80 ms of prefetch for audio) and the decoder thread;
- send: `RTCRtpSender` packs an `av.Packet` from its track as it is (the path aiortc keeps for
  `MediaPlayer(decode=False)`), and encodes an `av.AudioFrame`; `RelayTrack` yields either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket

from callboard.log import get_logger

log = get_logger("server.rtc.relay")

OPUS_CLOCK_RATE: Final = 48000
OPUS_TIME_BASE: Final = Fraction(1, OPUS_CLOCK_RATE)
RELAY_QUEUE_FRAMES: Final = 50
"""Frames a subscriber may lag (1 s of 20 ms frames) before the oldest are dropped."""
RTP_TIMESTAMP_MODULO: Final = 1 << 32

if TYPE_CHECKING:
    Frame: TypeAlias = av.Packet[Any] | av.AudioFrame
else:  # av.Packet is generic only in its stubs
    Frame = av.Packet | av.AudioFrame
"""What flows through a room: an encoded Opus packet (pts in 1/48000 s), or PCM to be encoded
by each WebRTC subscriber's sender."""
FrameSink = Callable[[Frame], None]


class OpusUnwrapper:
    """RTP packets of one stream to `av.Packet`s whose pts count 48 kHz ticks from the first."""

    def __init__(self) -> None:
        self._origin: int | None = None

    def packet(self, rtp: RtpPacket) -> av.Packet[Any]:
        if self._origin is None:
            self._origin = rtp.timestamp
        frame = av.Packet(rtp.payload)
        frame.pts = (rtp.timestamp - self._origin) % RTP_TIMESTAMP_MODULO
        frame.time_base = OPUS_TIME_BASE
        return frame


def tap_receiver(receiver: Any, payload_types: frozenset[int], sink: FrameSink) -> None:
    """Send the Opus payloads `receiver` gets to `sink`, and nothing to aiortc's decoder.

    `payload_types` are the Opus payload types negotiated for it; other packets are dropped.
    """
    unwrap = OpusUnwrapper()

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.payload and packet.payload_type in payload_types:
            sink(unwrap.packet(packet))

    receiver._handle_rtp_packet = handle_rtp_packet


class RelayTrack(MediaStreamTrack):
    """An audio track fed by `push` (one per subscriber); an aiortc sender reads it."""

    kind = "audio"

    def __init__(self, track_id: str) -> None:
        super().__init__()
        self._id = track_id
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(RELAY_QUEUE_FRAMES)
        self.dropped = 0

    def push(self, frame: Frame) -> None:
        if self.readyState != "live":
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self) -> Frame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)
        super().stop()
