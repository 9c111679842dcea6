"""One call's RTP leg: a UDP socket on the gateway's address, G.711 in and out in 20 ms frames,
a jitter buffer, and RFC 4733 DTMF both ways. Packets from anyone but the caller's first source
("latching", as livekit-sip and most SBCs do), garbage and reordering never reach the room."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable
from typing import Final

import numpy as np

from callboard.log import get_logger
from callboard.server.sip.codecs import CODECS, FRAME_SAMPLES, Pcm
from callboard.server.sip.jitter import JitterBuffer
from callboard.server.sip.rtp import (
    DTMF_DIGITS,
    DTMF_VOLUME,
    MAX_SEQ,
    MAX_TIMESTAMP,
    DtmfEvent,
    DtmfReceiver,
    RtpPacket,
    parse_rtp,
)
from callboard.server.sip.sdp import Answer

log = get_logger("server.sip.media")

FRAME_S: Final = 0.02
MAX_QUEUED_FRAMES: Final = 50 * 30
"""Audio queued towards the caller: 30 s at most; older frames are dropped first."""
DTMF_END_REPEATS: Final = 3
DTMF_DURATION_MS: Final = 100
SSRC_SWITCH_PACKETS: Final = 10
DYNAMIC_PT: Final = range(96, 128)
SENDING: Final = frozenset({"sendrecv", "sendonly"})
"""Our answer's directions that let us send."""
HOLD_ADDRESS: Final = "0.0.0.0"

AudioSink = Callable[[Pcm], None]
DigitSink = Callable[[str], None]


class RtpSession(asyncio.DatagramProtocol):
    """RTP for one call. `on_audio` gets 8 kHz 20 ms PCM frames from the caller (silence for a
    lost one), `on_digit` each DTMF digit; `play()` queues audio to the caller."""

    def __init__(self, on_audio: AudioSink, on_digit: DigitSink) -> None:
        self._on_audio = on_audio
        self._on_digit = on_digit
        self._transport: asyncio.DatagramTransport | None = None
        self.answer: Answer | None = None
        self.remote: tuple[str, int] | None = None
        self._latched: tuple[str, int] | None = None
        self._ssrc_in: int | None = None
        self._new_ssrc: tuple[int, int] = (0, 0)
        self._jitter = JitterBuffer()
        self._dtmf = DtmfReceiver()
        self._out: deque[bytes] = deque(maxlen=MAX_QUEUED_FRAMES)
        self._seq = secrets.randbelow(MAX_SEQ)
        self._ts = secrets.randbelow(MAX_TIMESTAMP)
        self._ssrc = secrets.randbits(32)
        self._sender: asyncio.Task[None] | None = None
        self.source: Callable[[], Pcm | None] | None = None
        """Where audio comes from when nothing was `play`ed (the room's mix)."""
        self.received = 0
        self.dropped = 0
        self.sent = 0
        self.sending = False

    async def open(self, host: str) -> int:
        """Bind a free UDP port on `host`; returns it."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        self._transport = transport
        return int(transport.get_extra_info("sockname")[1])

    def start(self, answer: Answer, remote: tuple[str, int]) -> None:
        """Begin sending to `remote` with the negotiated codec."""
        self.update(answer, remote)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_task(), name="sip-rtp-send"
            )

    def update(self, answer: Answer, remote: tuple[str, int]) -> None:
        """A new answer (re-INVITE): the destination may move (livekit-sip inbound.go
        updateRemoteFromSDP), and we send only when our answer allows it: none while the
        phone holds the call with sendonly, inactive or the RFC 2543 address 0.0.0.0
        (RFC 3264 §8.4)."""
        self.answer, self.remote = answer, remote
        self.sending = answer.direction in SENDING and remote[0] != HOLD_ADDRESS and remote[1] > 0

    @property
    def lost(self) -> int:
        """Caller frames never received (gaps the jitter buffer gave up on)."""
        return self._jitter.lost

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- receiving ---------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = self.answer
        packet = parse_rtp(data)
        if packet is None or answer is None:
            self.dropped += 1
            return
        if self._latched is None:
            self._latched = addr
        elif addr != self._latched:
            self.dropped += 1
            return
        self.received += 1
        if packet.payload_type == answer.codec_pt:
            if not self._same_stream(packet):
                self.dropped += 1
                return
            self._jitter.push(packet)
            codec = CODECS[answer.codec]
            for ready in self._jitter.pop():
                pcm = codec.decode(ready.payload) if ready is not None else _silence()
                self._on_audio(pcm)
        elif packet.payload_type == answer.dtmf_pt or packet.payload_type in DYNAMIC_PT:
            # sipp's play_dtmf sends telephone-events on 96/97 whatever was negotiated
            digit = self._dtmf.push(packet)
            if digit:
                self._on_digit(digit)
        else:
            self.dropped += 1

    def _same_stream(self, packet: RtpPacket) -> bool:
        """Whether `packet` belongs to the caller's stream (its SSRC). A new SSRC is taken only
        after SSRC_SWITCH_PACKETS packets in a row carry it (the phone restarted its stream):
        one stray packet that parses as RTP never resets the jitter buffer."""
        if self._ssrc_in is None or packet.ssrc == self._ssrc_in:
            self._ssrc_in = packet.ssrc
            self._new_ssrc = (0, 0)
            return True
        ssrc, count = self._new_ssrc
        self._new_ssrc = (packet.ssrc, count + 1 if ssrc == packet.ssrc else 1)
        if self._new_ssrc[1] >= SSRC_SWITCH_PACKETS:
            self._ssrc_in, self._new_ssrc = packet.ssrc, (0, 0)
            self._jitter = JitterBuffer()
            return True
        return False

    def error_received(self, exc: Exception) -> None:
        log.debug("rtp socket error", extra={"error": str(exc)})

    # -- sending -----------------------------------------------------------------------------

    def play(self, pcm: Pcm) -> None:
        """Queue 8 kHz PCM for the caller, cut into 20 ms frames (the last one padded)."""
        answer = self.answer
        if answer is None:
            return
        codec = CODECS[answer.codec]
        for start in range(0, len(pcm), FRAME_SAMPLES):
            frame = pcm[start : start + FRAME_SAMPLES]
            if len(frame) < FRAME_SAMPLES:
                frame = np.pad(frame, (0, FRAME_SAMPLES - len(frame)))
            self._out.append(codec.encode(frame))

    def clear(self) -> None:
        """Drop audio not yet sent (the agent was interrupted)."""
        self._out.clear()

    def send_digit(self, digit: str, duration_ms: int = DTMF_DURATION_MS) -> None:
        """One RFC 4733 event: start, updates every 20 ms, three end packets."""
        answer, remote, transport = self.answer, self.remote, self._transport
        if answer is None or answer.dtmf_pt is None or remote is None or transport is None:
            return
        if not self.sending:
            return
        code = DTMF_DIGITS.find(digit.upper())
        if code < 0:
            return
        timestamp = self._ts
        steps = max(1, duration_ms // 20)
        for i in range(1, steps + 1):
            event = DtmfEvent(code, i == steps, DTMF_VOLUME, i * FRAME_SAMPLES).encode()
            for _ in range(DTMF_END_REPEATS if i == steps else 1):
                packet = RtpPacket(
                    answer.dtmf_pt, self._next_seq(), timestamp, self._ssrc, event, marker=i == 1
                )
                self._send(packet)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % MAX_SEQ
        return self._seq

    def _send(self, packet: RtpPacket) -> None:
        if self._transport is not None and self.remote is not None:
            self._transport.sendto(packet.encode(), self.remote)
            self.sent += 1

    async def _send_task(self) -> None:
        """Every 20 ms one frame: queued audio, else silence (keeps NAT bindings and the
        caller's jitter buffer fed, as livekit-sip does)."""
        loop = asyncio.get_running_loop()
        answer = self.answer
        assert answer is not None
        silence = CODECS[answer.codec].silence
        next_at = loop.time()
        codec = CODECS[answer.codec]
        while True:
            pcm = self.source() if self.source is not None and not self._out else None
            if pcm is not None:
                payload = codec.encode(pcm)
            else:
                payload = self._out.popleft() if self._out else silence
            if self.sending:  # on hold the room's audio is drained, not sent
                packet = RtpPacket(answer.codec_pt, self._next_seq(), self._ts, self._ssrc, payload)
                self._send(packet)
            self._ts = (self._ts + FRAME_SAMPLES) % MAX_TIMESTAMP
            next_at += FRAME_S
            delay = next_at - loop.time()
            if delay < -1.0:  # the loop stalled: do not burst to catch up
                next_at = loop.time()
            await asyncio.sleep(max(0.0, delay))


def _silence() -> Pcm:
    return np.zeros(FRAME_SAMPLES, dtype=np.int16)
