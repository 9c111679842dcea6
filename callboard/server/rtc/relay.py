"""Audio relayed as the publisher's RTP: each packet is decrypted once, routed to the room, and
written to every subscriber with its header rewritten (SSRC, payload type, sequence,
timestamp) and SRTP-protected straight onto the subscriber's transport. No decoding, no
per-packet task or queue: forwarding is a few microseconds of Python per subscriber.

Hooks into aiortc 1.16.0 / aioice 0.13.0 (pinned in pyproject.toml), all on instances:
- receive (`fast_receive`): the publisher connection's ICE sockets hand SRTP (not SRTCP) to a
  function that unprotects, parses and routes each packet at once, instead of aioice's STUN
  parse, queue and DTLS task; RTCP, DTLS and data channels keep aiortc's path;
- `tap_receiver`: a receiver's packets go to the room, not to its jitter buffer and decoder,
  with the receiver's statistics kept so its RTCP receiver reports stay true;
- send (`RtpForwarder`): one per subscriber `RTCRtpSender`, which aiortc keeps for
  negotiation and RTCP (sender reports from the forwarder's counts; receiver reports, NACK
  and PLI from the client reach it as before). Its own RTP loop only waits on `IdleTrack`.

Server-side members (a phone call) publish an Opus `av.Packet` (pts in 1/48000 s) or a PCM
`av.AudioFrame` (encoded per subscriber with aiortc's Opus encoder) and receive what WebRTC
clients publish as aiortc `RtpPacket`s (`payload` is the Opus packet).
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

import av
import pylibsrtp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from aiortc.codecs import get_encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket, is_rtcp

from callboard.log import get_logger

log = get_logger("server.rtc.relay")

OPUS_CLOCK_RATE: Final = 48000
OPUS_TIME_BASE: Final = Fraction(1, OPUS_CLOCK_RATE)
OPUS_FRAME_TICKS: Final = 960
"""20 ms at 48 kHz: where a new source's first packet goes after the previous source's last."""
MID_URI: Final = "urn:ietf:params:rtp-hdrext:sdes:mid"
AUDIO_LEVEL_URI: Final = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
ONE_BYTE_EXTENSIONS: Final = 0xBEDE
NTP_EPOCH_OFFSET_S: Final = 2208988800
ICE_COMPONENT: Final = 1
FAST_SINK: Final = "_callboard_on_rtp"
"""The receiver attribute holding its synchronous packet handler (set by `tap_receiver`)."""
FORWARDER: Final = "_callboard_forwarder"
RTP_HEADER: Final = struct.Struct("!BBHII")

if TYPE_CHECKING:
    Frame: TypeAlias = RtpPacket | av.Packet[Any] | av.AudioFrame
else:  # av.Packet is generic only in its stubs
    Frame = RtpPacket | av.Packet | av.AudioFrame
"""What flows through a room: a WebRTC client's RTP packet (Opus payload), an encoded Opus
packet from a server-side member (pts in 1/48000 s), or PCM to be encoded per subscriber."""
FrameSink = Callable[[Frame], None]


def opus_payload(frame: Frame) -> av.Packet[Any] | av.AudioFrame:
    """`frame` as PyAV can decode it (an RTP packet's payload becomes an `av.Packet`)."""
    return av.Packet(frame.payload) if isinstance(frame, RtpPacket) else frame


def tap_receiver(
    receiver: Any,
    payload_types: frozenset[int],
    sink: FrameSink,
    on_level: Callable[[int, int, float], None],
) -> None:
    """Send the Opus packets `receiver` gets to `sink`, and nothing to aiortc's decoder; each
    packet's audio level (-dBov, RTP timestamp, arrival) to `on_level` where it has one.

    `payload_types` are the Opus payload types negotiated for it; other packets are dropped.
    The receiver's per-SSRC statistics are kept for its RTCP receiver reports."""
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams

    def on_rtp(packet: RtpPacket) -> None:
        if packet.payload and packet.payload_type in payload_types:
            stats = streams.get(packet.ssrc)
            if stats is None:
                stats = streams[packet.ssrc] = StreamStatistics(OPUS_CLOCK_RATE)
            stats.add(packet)
            level = packet.extensions.audio_level
            if level is not None:
                on_level(level[1], packet.timestamp, time.monotonic())
            sink(packet)

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        on_rtp(packet)  # packets that came before `fast_receive` took the socket

    setattr(receiver, FAST_SINK, on_rtp)
    receiver._handle_rtp_packet = handle_rtp_packet


def fast_receive(dtls: RTCDtlsTransport) -> None:
    """Route the SRTP packets arriving on `dtls`'s ICE sockets as they arrive (see module)."""
    for protocol in dtls.transport._connection._protocols:
        if getattr(protocol, FAST_SINK, None) is None:
            handler = _fast_datagrams(dtls, protocol.datagram_received)
            setattr(protocol, FAST_SINK, handler)
            protocol.datagram_received = handler  # type: ignore[method-assign,assignment]


def _fast_datagrams(
    dtls: RTCDtlsTransport, slow: Callable[[bytes, Any], None]
) -> Callable[[bytes, Any], None]:
    router = dtls._rtp_router
    extensions = dtls._rtp_header_extensions_map

    def datagram_received(data: bytes, addr: Any) -> None:
        srtp = dtls._rx_srtp
        if srtp is None or not 127 < data[0] < 192 or is_rtcp(data):
            slow(data, addr)  # STUN, DTLS, SCTP, RTCP: aiortc's own path
            return
        try:
            packet = RtpPacket.parse(srtp.unprotect(data), extensions)
        except (pylibsrtp.Error, ValueError):
            return
        receiver = router.route_rtp(packet)
        on_rtp = getattr(receiver, FAST_SINK, None)
        if on_rtp is not None:
            on_rtp(packet)

    return datagram_received


def start_media_when_connected(pc: RTCPeerConnection) -> None:
    """Start every negotiated sender and receiver of `pc` once its connection is up.

    aiortc 1.16 starts a transceiver's sender or receiver at the end of the negotiation that
    added it, only if DTLS is connected by then: a renegotiation applied while the first
    negotiation's DTLS handshake is still running leaves them unstarted for good (a
    subscribed track never sent, a received one never routed). Running aiortc's own connect
    step again when the connection comes up starts them; each start is idempotent."""

    tasks: set[asyncio.Task[None]] = set()

    def changed() -> None:
        if pc.connectionState == "connected":
            connect = pc._RTCPeerConnection__connect  # type: ignore[attr-defined]
            task = asyncio.ensure_future(connect())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    pc.on("connectionstatechange", changed)


class RtpForwarder:
    """Writes one published track's frames to one subscriber sender as RTP (see module)."""

    def __init__(self, sender: RTCRtpSender) -> None:
        self._sender = sender
        self.enabled = True
        self.dropped = 0
        self._payload_type: int | None = None
        self._codec: Any = None
        self._encoder: Any = None
        self._ssrc = sender._ssrc
        self._plain_ext = b""
        self._level_ext: tuple[bytes, bytes] | None = None
        self._source: object = None
        self._seq_delta = 0
        self._ts_delta = 0
        self._next_seq = random.getrandbits(16)
        self._next_ts = random.getrandbits(32)
        self._local_seq = 0
        self._packets = 0
        self._octets = 0

    @classmethod
    def of(cls, sender: RTCRtpSender) -> RtpForwarder:
        """The sender's forwarder, made (and bound to its negotiation) on first use."""
        forwarder: RtpForwarder | None = getattr(sender, FORWARDER, None)
        if forwarder is None:
            forwarder = cls(sender)
            setattr(sender, FORWARDER, forwarder)
            negotiated = sender.send

            async def send(parameters: Any) -> None:
                forwarder.bind(parameters)
                await negotiated(parameters)

            sender.send = send  # type: ignore[method-assign]
        return forwarder

    def bind(self, parameters: Any) -> None:
        """The negotiated payload type and header extensions (from each applied answer)."""
        self._codec = parameters.codecs[0]
        self._payload_type = self._codec.payloadType
        ids = {e.uri: e.id for e in parameters.headerExtensions}
        mid = str(parameters.muxId or "").encode()
        mid_element = bytes([(ids[MID_URI] << 4) | (len(mid) - 1)]) + mid if MID_URI in ids else b""
        self._plain_ext = _extension_block(mid_element)
        if AUDIO_LEVEL_URI in ids:
            head = mid_element + bytes([ids[AUDIO_LEVEL_URI] << 4])
            padding = b"\0" * (-(len(head) + 1) % 4)
            words = (len(head) + 1 + len(padding)) // 4
            self._level_ext = (struct.pack("!HH", ONE_BYTE_EXTENSIONS, words) + head, padding)

    def __call__(self, frame: Frame) -> None:
        if not self.enabled or self._payload_type is None:
            return
        if isinstance(frame, RtpPacket):
            level = frame.extensions.audio_level
            self._write(
                frame.ssrc,
                frame.sequence_number,
                frame.timestamp,
                frame.marker,
                frame.payload,
                level,
            )
        elif isinstance(frame, av.AudioFrame):
            if self._encoder is None:
                self._encoder = get_encoder(self._codec)
            payloads, timestamp = self._encoder.encode(frame)
            for payload in payloads:
                self._write_local(timestamp, payload)
        else:
            self._write_local(int(frame.pts or 0), bytes(frame))

    def _write_local(self, timestamp: int, payload: bytes) -> None:
        self._local_seq = (self._local_seq + 1) & 0xFFFF
        self._write(None, self._local_seq, timestamp, 1, payload, None)

    def _write(
        self,
        source: object,
        seq: int,
        timestamp: int,
        marker: int,
        payload: bytes,
        level: tuple[bool, int] | None,
    ) -> None:
        if source != self._source:  # a new stream continues where the last one stopped
            self._source = source
            self._seq_delta = (self._next_seq - seq) & 0xFFFF
            self._ts_delta = (self._next_ts - timestamp) & 0xFFFFFFFF
        seq = (seq + self._seq_delta) & 0xFFFF
        timestamp = (timestamp + self._ts_delta) & 0xFFFFFFFF
        self._next_seq = (seq + 1) & 0xFFFF
        self._next_ts = (timestamp + OPUS_FRAME_TICKS) & 0xFFFFFFFF
        if level is not None and self._level_ext is not None:
            head, padding = self._level_ext
            ext = head + bytes([(0x80 if level[0] else 0) | (level[1] & 0x7F)]) + padding
        else:
            ext = self._plain_ext
        first = 0x90 if ext else 0x80
        header = RTP_HEADER.pack(
            first, (marker << 7) | (self._payload_type or 0), seq, timestamp, self._ssrc
        )
        if self._send(header + ext + payload):
            self._count(timestamp, len(payload))
        else:
            self.dropped += 1

    def _send(self, data: bytes) -> bool:
        dtls = self._sender.transport
        srtp = dtls._tx_srtp
        if srtp is None or dtls._state != State.CONNECTED:
            return False
        pair = dtls.transport._connection._nominated.get(ICE_COMPONENT)
        if pair is None or pair.protocol.transport is None:
            return False
        pair.protocol.transport.sendto(srtp.protect(data), pair.remote_addr)
        return True

    def _count(self, timestamp: int, octets: int) -> None:
        """What aiortc's sender puts in its RTCP sender reports."""
        sender = self._sender
        self._packets += 1
        self._octets += octets
        sender._RTCRtpSender__ntp_timestamp = int(  # type: ignore[attr-defined]
            (time.time() + NTP_EPOCH_OFFSET_S) * (1 << 32)
        )
        sender._RTCRtpSender__rtp_timestamp = timestamp  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count = self._packets  # type: ignore[attr-defined]
        sender._RTCRtpSender__octet_count = self._octets  # type: ignore[attr-defined]


def _extension_block(elements: bytes) -> bytes:
    if not elements:
        return b""
    padded = elements + b"\0" * (-len(elements) % 4)
    return struct.pack("!HH", ONE_BYTE_EXTENSIONS, len(padded) // 4) + padded


class IdleTrack(MediaStreamTrack):
    """The track a subscriber sender is given: it never yields (the forwarder sends for it)
    and ends when stopped, which ends aiortc's RTP loop for that sender."""

    kind = "audio"

    def __init__(self, track_id: str) -> None:
        super().__init__()
        self._id = track_id
        self._stopped = asyncio.Event()

    async def recv(self) -> NoReturn:
        await self._stopped.wait()
        raise MediaStreamError

    def stop(self) -> None:
        self._stopped.set()
        super().stop()
