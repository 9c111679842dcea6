"""The phone side of a call's media: G.711 both laws, RTP and RFC 4733 parsing, the jitter
buffer, and an RTP session on a real loopback socket fed garbage, reordered and foreign packets."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import warnings

import numpy as np
import pytest

from callboard.server.sip.codecs import FRAME_SAMPLES, PCMA, PCMU
from callboard.server.sip.jitter import JitterBuffer
from callboard.server.sip.media import RtpSession
from callboard.server.sip.rtp import DtmfEvent, RtpPacket, parse_event, parse_rtp
from callboard.server.sip.sdp import Answer
from tests.server.support import wait_until

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.parametrize(("codec", "reference"), [(PCMU, "lin2ulaw"), (PCMA, "lin2alaw")])
def test_g711_encodes_every_sample_as_the_reference_does(codec: object, reference: str) -> None:
    """Byte for byte what CPython's audioop (ITU G.711 reference code) gives, for all 65,536
    16-bit samples; decoding is checked the same way for all 256 code words."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    encode = getattr(audioop, reference)
    decode = getattr(audioop, reference.replace("lin2", "") + "2lin")
    assert codec.encode(ALL_SAMPLES) == encode(ALL_SAMPLES.tobytes(), 2)  # type: ignore[attr-defined]
    words = bytes(range(256))
    expected = np.frombuffer(decode(words, 2), dtype=np.int16)
    assert np.array_equal(codec.decode(words), expected)  # type: ignore[attr-defined]


def test_g711_round_trip_keeps_speech_level_signals() -> None:
    t = np.arange(8000) / 8000
    pcm = (6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    for codec in (PCMU, PCMA):
        back = codec.decode(codec.encode(pcm)).astype(np.float64)
        snr = 10 * np.log10(np.sum(pcm.astype(np.float64) ** 2) / np.sum((back - pcm) ** 2))
        assert snr > 30, (codec.name, snr)


def test_rtp_round_trip_and_garbage() -> None:
    packet = RtpPacket(0, 65535, 2**32 - 160, 0xDEADBEEF, b"\xff" * 160, marker=True)
    assert parse_rtp(packet.encode()) == packet
    for garbage in (b"", b"\x80", b"\x00" * 12, b"\x80\xc8" + b"\x00" * 10, bytes(range(12))):
        assert parse_rtp(garbage) is None
    padded = bytearray(packet.encode())
    padded[0] |= 0x20
    assert parse_rtp(bytes(padded) + b"\x00\x00\x03") is not None
    assert parse_rtp(bytes(padded) + b"\xff") is None, "padding longer than the payload"


def test_dtmf_event_round_trip() -> None:
    event = DtmfEvent(11, True, 10, 800)
    assert parse_event(event.encode()) == event and event.digit == "#"
    assert parse_event(b"\x10\x00\x00\x00") is None, "event 16 (flash) is not a digit"


def test_jitter_buffer_orders_drops_duplicates_and_marks_loss() -> None:
    buffer = JitterBuffer(depth=3)
    arrivals = [65534, 65535, 1, 0, 0, 3, 4, 5, 65000]
    out: list[int | None] = []
    for seq in arrivals:
        buffer.push(RtpPacket(0, seq, 0, 1, b""))
        out += [p.sequence if p else None for p in buffer.pop()]
    assert out == [65534, 65535, 0, 1, None, 3, 4, 5]
    assert buffer.late == 2 and buffer.lost == 1


ANSWER = Answer("127.0.0.1", 0, "PCMU", 0, 101)


async def test_rtp_session_survives_garbage_reordering_and_strangers() -> None:
    """1 s of a tone sent as 50 packets, shuffled in windows of 3, mixed with 200 garbage
    datagrams and packets from a second socket: the tone arrives whole and in order, and only
    from the first sender."""
    frames: list[np.ndarray] = []
    digits: list[str] = []
    session = RtpSession(frames.append, digits.append)
    port = await session.open("127.0.0.1")
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        phone.bind(("127.0.0.1", 0))
        session.start(ANSWER, phone.getsockname())
        t = np.arange(8000) / 8000
        tone = (5000 * np.sin(2 * np.pi * 400 * t)).astype(np.int16)
        packets = [
            RtpPacket(0, 1000 + i, i * FRAME_SAMPLES, 7, PCMU.encode(tone[i * 160 : (i + 1) * 160]))
            for i in range(50)
        ]
        order = [p for i in range(0, 50, 3) for p in reversed(packets[i : i + 3])]
        rng = random.Random(4475)
        phone.sendto(order[0].encode(), ("127.0.0.1", port))
        await wait_until(lambda: session.received == 1, "the first packet (latching)")
        for packet in order[1:]:
            phone.sendto(packet.encode(), ("127.0.0.1", port))
            for _ in range(4):
                phone.sendto(rng.randbytes(rng.randrange(0, 300)), ("127.0.0.1", port))
            stranger.sendto(packet.encode(), ("127.0.0.1", port))
            await asyncio.sleep(0.002)  # a burst, not a socket-buffer overflow
        await wait_until(lambda: len(frames) >= 49, "the tone's frames")
        heard = np.concatenate(frames)
        assert (
            np.abs(heard.astype(np.int32) - PCMU.decode(PCMU.encode(tone))[: len(heard)]).max() == 0
        )
        assert session.dropped >= 49, "the stranger's packets were dropped"
        assert digits == []
    finally:
        session.close()
        phone.close()
        stranger.close()


async def test_rtp_session_sends_20ms_frames_and_dtmf() -> None:
    session = RtpSession(lambda pcm: None, lambda digit: None)
    await session.open("127.0.0.1")
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    phone.setblocking(False)
    try:
        session.start(ANSWER, phone.getsockname())
        session.play(np.full(FRAME_SAMPLES * 5, 1000, dtype=np.int16))
        session.send_digit("5")
        await asyncio.sleep(0.2)
        received = []
        while True:
            try:
                received.append(parse_rtp(phone.recv(2048)))
            except BlockingIOError:
                break
        audio = [p for p in received if p is not None and p.payload_type == 0]
        events = [
            parse_event(p.payload) for p in received if p is not None and p.payload_type == 101
        ]
        assert 5 <= len(audio) <= 14 and all(len(p.payload) == FRAME_SAMPLES for p in audio)
        assert [e.digit for e in events if e is not None and e.end] == ["5", "5", "5"]
        stamps = [p.timestamp for p in audio]
        assert all(b - a == FRAME_SAMPLES for a, b in itertools.pairwise(stamps))
    finally:
        session.close()
        phone.close()
