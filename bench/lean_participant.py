"""A lean WebRTC participant for load: LiveKit's `/rtc` signalling spoken as the SDKs speak it
(join, AddTrackRequest, publisher offer, the server's subscriber offers, trickle, ping, leave)
over aiortc peer connections, publishing Opus packets encoded once and replayed in real time,
and counting the packets it receives without decoding them.

It works against `callboard server` and livekit-server alike. It costs a fraction of the
official rtc SDK (no Opus encoding per call, no audio device, no decoding): packets go out
through `RtpForwarder` (an RTP header, SRTP, one `sendto`) and come in through
`fast_receive`/`tap_receiver` (SRTP, parse, count), the same hooks `callboard server` uses.
aiortc keeps ICE, DTLS and RTCP (sender reports from what was sent, receiver reports from
what was received), so each server sees a real client.

What one track sends, per second (`PERIOD_FRAMES` 20 ms frames), is what the rtc SDK's
libwebrtc sends with Opus DTX (the servers answer `usedtx=1`), as captured from it: a 200 ms
tone burst (`BURST_FRAMES`, the first packet with the RTP marker bit), the encoder's silence
until DTX starts (`SPEECH_END_FRAME`), a one-byte DTX frame, then every 400 ms
(`DTX_INTERVAL_FRAMES`) a silence frame and a DTX frame, the RTP timestamp running on over
the gaps: 24 packets a second. `steady` (DTX off) sends all 50.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtp import RtpPacket
from livekit.protocol import models
from livekit.protocol import rtc as signal

from callboard.server.rtc.peer import parse_candidate
from callboard.server.rtc.relay import (
    OPUS_CLOCK_RATE,
    OPUS_FRAME_TICKS,
    IdleTrack,
    RtpForwarder,
    fast_receive,
    start_media_when_connected,
    tap_receiver,
)

FRAME_S: Final = 0.020
PERIOD_FRAMES: Final = 50
BURST_FRAMES: Final = 10
SPEECH_END_FRAME: Final = 21
"""The first DTX frame; frames before it are all sent (tone, then encoded silence)."""
DTX_INTERVAL_FRAMES: Final = 20
TONE_HZ: Final = 440.0
TONE_AMPLITUDE: Final = 0.3 * 32767
OPUS_BITRATE: Final = 32000
OPUS: Final = "audio/opus"
PROTOCOL: Final = 15
"""The signalling protocol version the client announces (the rtc SDK 1.1's)."""
SIGNAL_TIMEOUT_S: Final = 20.0
CONNECT_TIMEOUT_S: Final = 30.0
LEVEL_TONE: Final = (True, 20)
LEVEL_SILENCE: Final = (False, 127)
"""RFC 6464 audio levels (voice flag, -dBov) sent with the tone and the silence."""
PAYLOAD_TYPE: Final = 111
"""Any: the forwarder writes the negotiated one."""


@dataclass(frozen=True)
class Voice:
    """One period of packets: `(payload, marker, level)` per frame, None where DTX sends
    nothing."""

    frames: tuple[tuple[bytes, int, tuple[bool, int]] | None, ...]
    onset: bytes
    """The burst's first payload: a receiver that sees it heard a burst start."""

    @property
    def packets_per_period(self) -> int:
        return sum(f is not None for f in self.frames)


def encode_voice(dtx: bool) -> Voice:
    """Encode one period with libopus (20 ms mono frames), once per process."""
    ctx: Any = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = OPUS_CLOCK_RATE
    ctx.layout = "mono"
    ctx.format = "s16"
    ctx.bit_rate = OPUS_BITRATE
    ctx.time_base = Fraction(1, OPUS_CLOCK_RATE)
    ctx.options = {"application": "voip", "frame_duration": "20"}
    samples = np.zeros(PERIOD_FRAMES * OPUS_FRAME_TICKS, dtype=np.int16)
    t = np.arange(BURST_FRAMES * OPUS_FRAME_TICKS)
    samples[: t.size] = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t / OPUS_CLOCK_RATE)).astype(
        np.int16
    )
    payloads: list[bytes] = []
    # two periods: the second one's packets follow a period as they will on the wire
    for i in range(2 * PERIOD_FRAMES):
        chunk = samples[(i % PERIOD_FRAMES) * OPUS_FRAME_TICKS :][:OPUS_FRAME_TICKS]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_CLOCK_RATE
        frame.pts = i * OPUS_FRAME_TICKS
        payloads += [bytes(p) for p in ctx.encode(frame)]
    payloads += [bytes(p) for p in ctx.encode(None)]
    period = payloads[PERIOD_FRAMES : 2 * PERIOD_FRAMES]
    frames: list[tuple[bytes, int, tuple[bool, int]] | None] = []
    for i, payload in enumerate(period):
        since_dtx = (i - SPEECH_END_FRAME) % DTX_INTERVAL_FRAMES
        if i < BURST_FRAMES:
            frames.append((payload, int(i == 0), LEVEL_TONE))
        elif not dtx or i < SPEECH_END_FRAME or since_dtx == DTX_INTERVAL_FRAMES - 1:
            frames.append((payload, 0, LEVEL_SILENCE))
        elif since_dtx == 0:
            frames.append((payload[:1], 0, LEVEL_SILENCE))  # the TOC byte alone: DTX
        else:
            frames.append(None)
    return Voice(tuple(frames), period[0])


class SignalClosed(Exception):
    """The server ended the signalling connection (or it failed)."""


@dataclass
class Ear:
    """What one participant received: packets, when a burst's first packet arrived, and each
    packet's arrival against its RTP timestamp (what a receiver's jitter buffer sees)."""

    onset: bytes
    packets: int = 0
    onsets: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    """Arrival − RTP time (unknown constant offset): its spread is the stream's jitter."""
    _first_ts: int | None = None

    def __call__(self, packet: Any) -> None:
        now = time.monotonic()
        self.packets += 1
        if packet.payload == self.onset:
            self.onsets.append(now)
        if self._first_ts is None:
            self._first_ts = packet.timestamp
        ticks = (packet.timestamp - self._first_ts) & 0xFFFFFFFF
        self.delays.append(now - ticks / OPUS_CLOCK_RATE)

    def jitter(self) -> list[float]:
        """Each packet's delay beyond the least delayed one's (seconds)."""
        least = min(self.delays, default=0.0)
        return [d - least for d in self.delays]


def _ignore_level(level: int, timestamp: int, arrival: float) -> None:
    pass


class LeanParticipant:
    """One participant: a signalling WebSocket and its publisher and subscriber connections."""

    def __init__(self, url: str, token: str, voice: Voice) -> None:
        self._url = url
        self._token = token
        self.voice = voice
        config = RTCConfiguration(iceServers=[])  # aiortc's default is a public STUN server
        self.publisher = RTCPeerConnection(config)
        self.subscriber = RTCPeerConnection(config)
        for pc in (self.publisher, self.subscriber):
            start_media_when_connected(pc)
        self.ear = Ear(voice.onset)
        self.sent_onsets: list[float] = []
        self.forwarder: RtpForwarder | None = None
        self.join: signal.JoinResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._joined = asyncio.Event()
        self._published: dict[str, asyncio.Future[models.TrackInfo]] = {}
        self._answered: asyncio.Future[None] | None = None
        self._early: dict[RTCPeerConnection, list[Any]] = {self.publisher: [], self.subscriber: []}
        self._tapped: set[RTCRtpReceiver] = set()
        self._subscribed = asyncio.Event()
        self._seq = 0
        self.closed: str | None = None

    # -- signalling ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Join the room (the token's): signalling up and the JoinResponse read."""
        self._session = aiohttp.ClientSession()
        query = f"auto_subscribe=1&sdk=python&protocol={PROTOCOL}&adaptive_stream=0"
        self._ws = await self._session.ws_connect(
            f"{self._url}/rtc?{query}", headers={"Authorization": f"Bearer {self._token}"}
        )
        self._tasks.append(asyncio.create_task(self._read_task(), name="lean-signal-read"))
        async with asyncio.timeout(SIGNAL_TIMEOUT_S):
            await self._joined.wait()
        if self.join is None:
            raise SignalClosed(self.closed or "no JoinResponse")
        self._tasks.append(asyncio.create_task(self._ping_task(), name="lean-signal-ping"))

    async def _send(self, req: signal.SignalRequest) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(req.SerializeToString())

    async def _read_task(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                if frame.type != aiohttp.WSMsgType.BINARY:
                    break
                msg = signal.SignalResponse()
                msg.ParseFromString(frame.data)
                await self._on_signal(msg)
        finally:
            self.closed = self.closed or "the server closed the signal connection"
            self._joined.set()
            if self._answered is not None and not self._answered.done():
                self._answered.set_exception(SignalClosed(self.closed))

    async def _on_signal(self, msg: signal.SignalResponse) -> None:
        which = msg.WhichOneof("message")
        if which == "join":
            self.join = msg.join
            self._joined.set()
        elif which == "offer":
            await self._answer_subscriber(msg.offer.sdp)
        elif which == "answer":
            await self.publisher.setRemoteDescription(
                RTCSessionDescription(msg.answer.sdp, "answer")
            )
            await self._add_early(self.publisher)
            if self._answered is not None and not self._answered.done():
                self._answered.set_result(None)
        elif which == "trickle":
            pc = self.subscriber if msg.trickle.target == signal.SUBSCRIBER else self.publisher
            candidate = parse_candidate(msg.trickle.candidateInit)
            if candidate is None:
                return
            if pc.remoteDescription is None:
                self._early[pc].append(candidate)
            else:
                await pc.addIceCandidate(candidate)
        elif which == "track_published":
            future = self._published.get(msg.track_published.cid)
            if future is not None and not future.done():
                future.set_result(msg.track_published.track)
        elif which == "leave":
            self.closed = (
                f"the server asked to leave ({models.DisconnectReason.Name(msg.leave.reason)})"
            )

    async def _add_early(self, pc: RTCPeerConnection) -> None:
        early, self._early[pc] = self._early[pc], []
        for candidate in early:
            await pc.addIceCandidate(candidate)

    async def _ping_task(self) -> None:
        assert self.join is not None
        interval = max(1, self.join.ping_interval)
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(interval)
                now = int(time.time() * 1000)
                await self._send(signal.SignalRequest(ping=now))
                await self._send(signal.SignalRequest(ping_req=signal.Ping(timestamp=now)))

    # -- media --------------------------------------------------------------------------------

    async def _answer_subscriber(self, sdp: str) -> None:
        pc = self.subscriber
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await self._add_early(pc)
        await pc.setLocalDescription(await pc.createAnswer())  # gathers: the sockets exist now
        for t in pc.getTransceivers():
            receiver = t.receiver
            if receiver in self._tapped or t.kind != "audio":
                continue
            self._tapped.add(receiver)
            pts = frozenset(
                c.payloadType for c in getattr(t, "_codecs", []) if c.mimeType.lower() == OPUS
            )
            tap_receiver(receiver, pts, self.ear, _ignore_level)
            fast_receive(receiver.transport)
            self._subscribed.set()
        answer = signal.SessionDescription(type="answer", sdp=str(pc.localDescription.sdp))
        await self._send(signal.SignalRequest(answer=answer))

    async def publish(self, name: str = "mic") -> models.TrackInfo:
        """AddTrackRequest, then the publisher offer with one Opus track; returns once the
        server answered and the connection is up."""
        cid = f"{name}-{id(self):x}"
        future: asyncio.Future[models.TrackInfo] = asyncio.get_running_loop().create_future()
        self._published[cid] = future
        add = signal.AddTrackRequest(
            cid=cid, name=name, type=models.AUDIO, source=models.TrackSource.MICROPHONE
        )
        await self._send(signal.SignalRequest(add_track=add))
        async with asyncio.timeout(SIGNAL_TIMEOUT_S):
            info = await future
        sender = self.publisher.addTrack(IdleTrack(cid))
        self.forwarder = RtpForwarder.of(sender)  # before the answer: it binds to it
        transceiver = next(t for t in self.publisher.getTransceivers() if t.sender is sender)
        caps = RTCRtpSender.getCapabilities("audio")
        transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() == OPUS])
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        self._answered = asyncio.get_running_loop().create_future()
        offer = signal.SessionDescription(
            type="offer", sdp=str(self.publisher.localDescription.sdp)
        )
        await self._send(signal.SignalRequest(offer=offer))
        async with asyncio.timeout(SIGNAL_TIMEOUT_S):
            await self._answered
        await self._connected(self.publisher)
        return info

    async def subscribed(self) -> None:
        """Wait until the other side's track is offered and the subscriber connection is up."""
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await self._subscribed.wait()
        await self._connected(self.subscriber)

    async def _connected(self, pc: RTCPeerConnection) -> None:
        done = asyncio.Event()
        pc.on("connectionstatechange", done.set)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while pc.connectionState != "connected":
                if pc.connectionState in ("failed", "closed"):
                    raise SignalClosed(f"peer connection {pc.connectionState}")
                done.clear()
                await done.wait()

    def send_frame(self, index: int) -> None:
        """Send frame `index` of the replayed voice (nothing where DTX is silent)."""
        frame = self.voice.frames[index % PERIOD_FRAMES]
        if frame is None or self.forwarder is None:
            return
        payload, marker, level = frame
        packet = RtpPacket(PAYLOAD_TYPE, marker, self._seq, index * OPUS_FRAME_TICKS, 1, payload)
        packet.extensions.audio_level = level
        self._seq = (self._seq + 1) & 0xFFFF
        sent = self.forwarder._packets
        self.forwarder(packet)
        if marker and self.forwarder._packets > sent:
            self.sent_onsets.append(time.monotonic())

    @property
    def packets_sent(self) -> int:
        return self.forwarder._packets if self.forwarder is not None else 0

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            leave = signal.LeaveRequest(reason=models.CLIENT_INITIATED)
            await self._send(signal.SignalRequest(leave=leave))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            self.publisher.close(), self.subscriber.close(), return_exceptions=True
        )
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()


class Pacer:
    """Sends every participant's frames on one 20 ms clock (one wake-up per frame for the
    whole process); each participant starts at its own offset in the period so the bursts of
    many calls spread over the second, as independent callers' would. Records how late each
    tick ran (a client that cannot keep real time shows here)."""

    def __init__(self, participants: list[LeanParticipant]) -> None:
        self._participants = participants
        self.lateness: list[float] = []

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        offsets = [(i * 7) % PERIOD_FRAMES for i in range(len(self._participants))]
        for tick in range(int(seconds / FRAME_S)):
            due = start + tick * FRAME_S
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lateness.append(max(0.0, loop.time() - due))
            for p, offset in zip(self._participants, offsets, strict=True):
                p.send_frame(tick + offset)
