"""The media side of sipp as a phone: RTP streams written as pcap files for sipp's
`play_pcap_audio` (which replays each UDP payload verbatim, paced by the capture times), and the
UDP socket a scenario's SDP names as the phone's media address, so the test hears what the
gateway sends to the phone."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Final

import numpy as np

from callboard.server.sip.codecs import FRAME_SAMPLES, PCMU, Pcm
from callboard.server.sip.media import FRAME_S
from callboard.server.sip.rtp import (
    DTMF_DIGITS,
    DTMF_VOLUME,
    MAX_SEQ,
    MAX_TIMESTAMP,
    DtmfEvent,
    RtpPacket,
    parse_rtp,
)

PCMU_PT: Final = 0
DTMF_PT: Final = 101
DTMF_FRAMES: Final = 3
"""A digit lasts 60 ms (ITU-T Q.24 asks receivers to take 40 ms)."""
DTMF_GAP_S: Final = 0.06
DTMF_END_REPEATS: Final = 3
PCAP_HEADER: Final = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
"""pcap file header: microsecond timestamps, link type Ethernet."""
ETHERNET_IPV4: Final = b"\x00" * 12 + b"\x08\x00"
LOOPBACK_IP: Final = bytes([127, 0, 0, 1])


class RtpStream:
    """One SSRC's packets with their send times; `take()` hands over what was added since the
    last call, so consecutive pcap files continue the same stream (sequence, timestamp)."""

    def __init__(self, ssrc: int = 0x5EED) -> None:
        self.ssrc = ssrc
        self._seq = 1000
        self._ts = 160_000
        self._at = 0.0
        self._packets: list[tuple[float, bytes]] = []

    def _add(self, packet: RtpPacket) -> None:
        self._packets.append((self._at, packet.encode()))

    def _next(self) -> int:
        self._seq = (self._seq + 1) % MAX_SEQ
        return self._seq

    def audio(self, pcm: Pcm) -> RtpStream:
        """8 kHz PCM as 20 ms PCMU packets (the last one padded with silence)."""
        padded = np.pad(pcm.astype(np.int16), (0, -len(pcm) % FRAME_SAMPLES))
        for start in range(0, len(padded), FRAME_SAMPLES):
            payload = PCMU.encode(padded[start : start + FRAME_SAMPLES])
            self._add(RtpPacket(PCMU_PT, self._next(), self._ts, self.ssrc, payload))
            self._ts = (self._ts + FRAME_SAMPLES) % MAX_TIMESTAMP
            self._at += FRAME_S
        return self

    def silence(self, seconds: float) -> RtpStream:
        return self.audio(np.zeros(int(seconds * 8000), dtype=np.int16))

    def digits(self, digits: str) -> RtpStream:
        """RFC 4733 events: per digit a start packet (marker), an update every 20 ms, three end
        packets, all on the digit's first timestamp; then DTMF_GAP_S of silence."""
        for digit in digits:
            code = DTMF_DIGITS.index(digit.upper())
            for i in range(1, DTMF_FRAMES + 1):
                end = i == DTMF_FRAMES
                event = DtmfEvent(code, end, DTMF_VOLUME, i * FRAME_SAMPLES).encode()
                for _ in range(DTMF_END_REPEATS if end else 1):
                    packet = RtpPacket(DTMF_PT, self._next(), self._ts, self.ssrc, event, i == 1)
                    self._add(packet)
                self._at += FRAME_S
            self._ts = (self._ts + DTMF_FRAMES * FRAME_SAMPLES) % MAX_TIMESTAMP
            self.silence(DTMF_GAP_S)
        return self

    def take(self) -> list[tuple[float, bytes]]:
        packets, self._packets = self._packets, []
        return packets


def write_pcap(path: Path, packets: list[tuple[float, bytes]], port: int = 6000) -> Path:
    """Each RTP packet in an Ethernet/IPv4/UDP frame on loopback (sipp rewrites the ports)."""
    records = [PCAP_HEADER]
    for at, rtp in packets:
        udp = struct.pack("!HHHH", port, port, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0)
        frame = ETHERNET_IPV4 + ip + LOOPBACK_IP + LOOPBACK_IP + udp
        seconds, micros = int(at), round((at % 1) * 1_000_000)
        records.append(struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(records))
    return path


class RtpSink(asyncio.DatagramProtocol):
    """The phone's media address: every PCMU packet decoded into `heard` (20 ms frames, in
    arrival order; loopback neither loses nor reorders)."""

    def __init__(self) -> None:
        self.heard: list[Pcm] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, host: str) -> tuple[RtpSink, int]:
        loop = asyncio.get_running_loop()
        transport, sink = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        sink.transport = transport
        return sink, int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        packet = parse_rtp(data)
        if packet is not None and packet.payload_type == PCMU_PT:
            self.heard.append(PCMU.decode(packet.payload))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
