"""One WebRTC client's two peer connections, as LiveKit clients use them: the client offers on
the publisher connection (its tracks and `_reliable`/`_lossy` data channels), the server offers
on the subscriber connection (the tracks it receives, and the server's own data channels)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from callboard.server.rtc.relay import (
    OPUS_CLOCK_RATE,
    FrameSink,
    IdleTrack,
    RtpForwarder,
    fast_receive,
    start_media_when_connected,
)

RELIABLE_LABEL: Final = "_reliable"
LOSSY_LABEL: Final = "_lossy"
OPUS: Final = "audio/opus"
MAX_PENDING_RELIABLE: Final = 256
"""Reliable packets kept for a subscriber channel that is not open yet."""
RECEIVING: Final = ("recvonly", "sendrecv")
"""The server's side of a publisher m-line the client sends on."""
SDP_START: Final = "v=0"
MEDIA_LINE: Final = "\nm="
MAX_CANDIDATES_PER_SDP: Final = 1000
"""ICE candidates taken for a connection per remote SDP (counted from that SDP, or from the
start); more are dropped: a trickle flood costs its sender, not the server's memory. The rtc
SDK legitimately sends ~10 per m-line and dozens of TCP ones per negotiation."""


class SignalError(Exception):
    """The client broke the signalling protocol; its connection ends with this reason."""


def _opus_payload_types(transceiver: RTCRtpTransceiver) -> frozenset[int]:
    codecs = getattr(transceiver, "_codecs", [])
    return frozenset(
        c.payloadType
        for c in codecs
        if c.mimeType.lower() == OPUS and c.clockRate == OPUS_CLOCK_RATE
    )


def opus_format(dtx: bool, stereo: bool) -> dict[str, int]:
    """The Opus format parameters livekit-server answers a publisher with: in-band FEC, DTX
    unless the track asked for none, stereo when it is stereo (a sender uses DTX only when the
    answer has it)."""
    fmtp = {"minptime": 10, "useinbandfec": 1}
    if dtx:
        fmtp["usedtx"] = 1
    if stereo:
        fmtp |= {"stereo": 1, "maxaveragebitrate": 510000}
    return fmtp


def _answer_opus_with(pc: RTCPeerConnection, fmtp: dict[str, int]) -> None:
    for t in pc.getTransceivers():
        for codec in getattr(t, "_codecs", []):
            if codec.mimeType.lower() == OPUS:
                codec.parameters = dict(fmtp)


def _opus_only(transceiver: RTCRtpTransceiver) -> None:
    caps = RTCRtpSender.getCapabilities("audio")
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() == OPUS])


async def _set_remote(pc: RTCPeerConnection, sdp: str, kind: str, what: str) -> None:
    """setRemoteDescription, with any failure to read `sdp` as the client's SignalError."""
    if not sdp.startswith(SDP_START) or MEDIA_LINE not in sdp:
        raise SignalError(f"unusable {what}: not an SDP with media sections")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp, kind))
    except Exception as e:  # aiortc's parser raises assorted types for malformed SDP
        raise SignalError(f"unusable {what} SDP: {type(e).__name__}: {e!s:.200}") from None


def parse_candidate(candidate_init: str) -> Any:
    """An aiortc candidate from a TrickleRequest's `candidateInit` JSON; None for the empty
    end-of-candidates one. Raises SignalError when it cannot be read."""
    try:
        init = json.loads(candidate_init)
        text = str(init.get("candidate", ""))
        if not text:
            return None
        candidate = candidate_from_sdp(
            text.split(":", 1)[1] if text.startswith("candidate:") else text
        )
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise SignalError(f"unreadable ICE candidate: {e}") from None
    return candidate


class PeerConnections:
    """The publisher and subscriber connections of one client, and the subscriber offers."""

    def __init__(
        self,
        send_offer: Callable[[str], None],
        on_track: Callable[[str, RTCRtpReceiver, frozenset[int], str | None], None],
        on_data: Callable[[bytes, bool], None],
        on_failed: Callable[[str], None],
        on_flood: Callable[[str], None],
    ) -> None:
        config = RTCConfiguration(iceServers=[])  # aiortc's default is a public STUN server
        self.publisher = RTCPeerConnection(config)
        self.subscriber = RTCPeerConnection(config)
        self._send_offer = send_offer
        self._on_track = on_track
        self._on_data = on_data
        self._on_failed = on_failed
        self._on_flood = on_flood
        self._channels = {
            RELIABLE_LABEL: self.subscriber.createDataChannel(RELIABLE_LABEL, ordered=True),
            LOSSY_LABEL: self.subscriber.createDataChannel(
                LOSSY_LABEL, ordered=False, maxRetransmits=0
            ),
        }
        self._pending_reliable: list[bytes] = []
        self._channels[RELIABLE_LABEL].on("open", self._flush_reliable)
        self._senders: dict[str, RTCRtpSender] = {}
        self._offer_wanted = asyncio.Event()
        self._answered = asyncio.Event()
        self._awaiting_answer = False
        self.negotiated = False
        """The client answered a subscriber offer at least once."""
        self._early_candidates: dict[RTCPeerConnection, list[Any]] = {
            self.publisher: [],
            self.subscriber: [],
        }
        self._candidates_taken = {self.publisher: 0, self.subscriber: 0}
        self.publisher.on("track", self._track)
        self.publisher.on("datachannel", self._datachannel)
        for name, pc in (("publisher", self.publisher), ("subscriber", self.subscriber)):
            pc.on("connectionstatechange", self._state_watcher(name, pc))
            start_media_when_connected(pc)

    def _state_watcher(self, name: str, pc: RTCPeerConnection) -> Callable[[], None]:
        def changed() -> None:
            if pc.connectionState == "failed":
                self._on_failed(f"the {name} peer connection failed (ICE or DTLS)")

        return changed

    # -- publisher ----------------------------------------------------------------------------

    async def answer_publisher(self, sdp: str, opus_fmtp: dict[str, int]) -> str:
        """Answer the client's publisher offer, Opus with `opus_fmtp` (see `opus_format`)."""
        await _set_remote(self.publisher, sdp, "offer", "publisher offer")
        _answer_opus_with(self.publisher, opus_fmtp)
        await self._remote_sdp_set(self.publisher)
        answer = await self.publisher.createAnswer()
        await self.publisher.setLocalDescription(answer)  # gathers: the ICE sockets exist now
        transports = {t.receiver.transport for t in self.publisher.getTransceivers()}
        if self.publisher.sctp is not None:
            transports.add(self.publisher.sctp.transport)
        for dtls in transports:
            fast_receive(dtls)
        return str(self.publisher.localDescription.sdp)

    def stopped_mids(self) -> set[str]:
        """Publisher m-lines the client's last offer no longer sends on: tracks it unpublished
        (LiveKit's SDKs unpublish by renegotiating, with no signal message)."""
        return {
            t.mid
            for t in self.publisher.getTransceivers()
            if t.mid is not None and t._offerDirection not in RECEIVING
        }

    def _track(self, track: Any) -> None:
        for t in self.publisher.getTransceivers():
            if t.receiver.track is track:
                self._on_track(track.id, t.receiver, _opus_payload_types(t), t.mid)
                return

    def _datachannel(self, channel: RTCDataChannel) -> None:
        reliable = channel.label == RELIABLE_LABEL
        if channel.label not in (RELIABLE_LABEL, LOSSY_LABEL):
            return

        def message(data: bytes | str) -> None:
            if isinstance(data, bytes):
                self._on_data(data, reliable)

        channel.on("message", message)

    # -- subscriber ---------------------------------------------------------------------------

    def add_track(self, stream_id: str, track_sid: str) -> FrameSink:
        """Offer `track_sid` to the client with msid `<stream_id> <track_sid>`."""
        sender = self.subscriber.addTrack(IdleTrack(track_sid))  # reuses an inactive one if any
        sender._stream_id = stream_id  # the msid stream: "<participant sid>|<track sid>"
        transceiver = self._transceiver(sender)
        transceiver.direction = "sendonly"
        _opus_only(transceiver)
        self._senders[track_sid] = sender
        forwarder = RtpForwarder.of(sender)
        forwarder.enabled = True
        self.renegotiate()
        return forwarder

    def remove_track(self, track_sid: str) -> None:
        sender = self._senders.pop(track_sid, None)
        if sender is None:
            return
        RtpForwarder.of(sender).enabled = False
        if sender.track is not None:
            sender.track.stop()
        sender.replaceTrack(None)
        self._transceiver(sender).direction = "inactive"
        self.renegotiate()

    def _transceiver(self, sender: RTCRtpSender) -> RTCRtpTransceiver:
        return next(t for t in self.subscriber.getTransceivers() if t.sender is sender)

    def renegotiate(self) -> None:
        self._offer_wanted.set()

    async def offer_task(self, join_timeout: float, answer_timeout: float) -> None:
        """Send subscriber offers, one at a time: each waits for its answer, the first one
        for `join_timeout` (the client is still connecting), later ones for `answer_timeout`.
        livekit-server bounds these the same way (JoinTimeout, negotiationFailedTimeout)."""
        timeout, what = join_timeout, "the first subscriber offer"
        while True:
            await self._offer_wanted.wait()
            self._offer_wanted.clear()
            offer = await self.subscriber.createOffer()
            await self.subscriber.setLocalDescription(offer)
            self._answered.clear()
            self._awaiting_answer = True
            self._send_offer(str(self.subscriber.localDescription.sdp))
            try:
                # asyncio.timeout, not wait_for: in 3.11 wait_for swallows a cancellation that
                # lands as the answer arrives
                async with asyncio.timeout(timeout):
                    await self._answered.wait()
            except TimeoutError:
                raise SignalError(f"the client did not answer {what} within {timeout:g}s") from None
            timeout, what = answer_timeout, "a subscriber offer"

    async def accept_answer(self, sdp: str) -> None:
        if not self._awaiting_answer:
            raise SignalError("an answer arrived while no subscriber offer was outstanding")
        await _set_remote(self.subscriber, sdp, "answer", "subscriber answer")
        self._awaiting_answer = False
        self.negotiated = True
        self._answered.set()
        await self._remote_sdp_set(self.subscriber)

    async def add_candidate(self, candidate_init: str, to_subscriber: bool) -> None:
        """Add a trickled candidate; one that comes before its connection's remote SDP (the
        SDK may send it before its answer) waits for it. Past `MAX_CANDIDATES_PER_SDP` since
        that connection's last remote SDP, candidates are dropped (logged once)."""
        pc = self.subscriber if to_subscriber else self.publisher
        candidate = parse_candidate(candidate_init)
        if candidate is None:
            return
        taken = self._candidates_taken[pc]
        self._candidates_taken[pc] = taken + 1
        if taken >= MAX_CANDIDATES_PER_SDP:
            if taken == MAX_CANDIDATES_PER_SDP:
                self._on_flood("subscriber" if to_subscriber else "publisher")
            return
        if pc.remoteDescription is not None:
            await pc.addIceCandidate(candidate)
        else:
            self._early_candidates[pc].append(candidate)

    async def _remote_sdp_set(self, pc: RTCPeerConnection) -> None:
        """A new negotiation: add the candidates that waited for it and count afresh."""
        early, self._early_candidates[pc] = self._early_candidates[pc], []
        self._candidates_taken[pc] = 0
        for candidate in early:
            await pc.addIceCandidate(candidate)

    # -- data ---------------------------------------------------------------------------------

    def send_data(self, payload: bytes, reliable: bool) -> None:
        channel = self._channels[RELIABLE_LABEL if reliable else LOSSY_LABEL]
        if channel.readyState == "open":
            channel.send(payload)
        elif reliable and len(self._pending_reliable) < MAX_PENDING_RELIABLE:
            self._pending_reliable.append(payload)

    def _flush_reliable(self) -> None:
        pending, self._pending_reliable = self._pending_reliable, []
        for payload in pending:
            self._channels[RELIABLE_LABEL].send(payload)

    async def aclose(self) -> None:
        for sender in self._senders.values():
            if sender.track is not None:
                sender.track.stop()
        closes: list[Awaitable[None]] = [self.publisher.close(), self.subscriber.close()]
        with contextlib.suppress(Exception):
            await asyncio.gather(*closes, return_exceptions=True)
