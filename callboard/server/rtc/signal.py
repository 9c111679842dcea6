"""`/rtc`: LiveKit's signalling WebSocket (protobuf `SignalRequest`/`SignalResponse`) for one
client, joined to its room as a `Member` whose media goes through `PeerConnections`.

`/rtc/v1` (single peer connection) answers 404, which makes LiveKit's SDKs fall back to `/rtc`.
A client that breaks the protocol (garbage frames, messages out of order, SDP aiortc cannot
use, an offer left unanswered) loses its own connection, with the reason logged with its room
and identity; the room and its other participants carry on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import WSMsgType, web
from google.protobuf.message import DecodeError
from livekit.protocol import models, rtc

from callboard.log import get_logger
from callboard.server.auth import AuthError, Grants, KeyStore
from callboard.server.config import ServerConfig
from callboard.server.ids import new_id
from callboard.server.rtc.model import (
    OPUS_MIME,
    TRACK_PREFIX,
    LiveRoom,
    Participant,
    participant_info,
)
from callboard.server.rtc.network import NO_MEDIA_ADDRESS, media_addresses
from callboard.server.rtc.peer import PeerConnections, SignalError, opus_format
from callboard.server.rtc.relay import FrameSink, tap_receiver

log = get_logger("server.rtc")

PROTOCOL_VERSION: Final = "1.13.5"
"""The livekit-server version whose /rtc protocol this endpoint speaks, as JoinResponse reports
it: SDKs gate features on it (the rtc SDK refuses RPC below 1.8.0)."""
CLIENT_LEFT: Final = "the client left"
CLOSE_TIMEOUT_S: Final = 5.0
PING_INTERVAL_S: Final = 5
PING_TIMEOUT_S: Final = 15
MAX_SIGNAL_FRAME_BYTES: Final = 1 << 20
V1_NOT_SUPPORTED: Final = "single peer connection (/rtc/v1) is not supported here: use /rtc"
KINDS: Final = {
    "": models.ParticipantInfo.STANDARD,
    "standard": models.ParticipantInfo.STANDARD,
    "ingress": models.ParticipantInfo.INGRESS,
    "egress": models.ParticipantInfo.EGRESS,
    "sip": models.ParticipantInfo.SIP,
    "agent": models.ParticipantInfo.AGENT,
}
RESUME_NOT_SUPPORTED: Final = "resuming a session is not supported here: join again"
FALSE_VALUES: Final = frozenset({"0", "false", "no"})


class RoomSource(Protocol):
    def live_room(self, name: str) -> LiveRoom:
        """The room `name`, created (with its automatic dispatch) if it does not exist."""


class Refusal(Exception):
    """A join refused before the WebSocket opens: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, grants: Grants | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.grants = grants


@dataclass(frozen=True)
class JoinSpec:
    """A validated join: who, where, and how."""

    grants: Grants
    room: str
    auto_subscribe: bool
    client_protocol: int

    def permission(self) -> models.ParticipantPermission:
        g = self.grants
        return models.ParticipantPermission(
            can_subscribe=g.video.get("canSubscribe", True) is not False,
            can_publish=g.video.get("canPublish", True) is not False,
            can_publish_data=g.video.get("canPublishData", True) is not False,
            hidden=bool(g.video.get("hidden")),
            can_update_metadata=bool(g.video.get("canUpdateOwnMetadata")),
            agent=bool(g.video.get("agent")) or g.kind == "agent",
        )


def admit(keys: KeyStore, request: web.Request) -> JoinSpec:
    """Check a join request as livekit-server does; raises Refusal."""
    try:
        grants = keys.verify_header(
            request.headers.get("Authorization"), request.query.get("access_token")
        )
    except AuthError as e:
        raise Refusal(401, str(e)) from None
    if grants is None:
        raise Refusal(401, "no access token: send it as 'Authorization: Bearer <token>'")
    if not grants.has("roomJoin"):
        raise Refusal(401, "permissions denied: the token lacks the roomJoin grant", grants)
    if not grants.identity:
        raise Refusal(400, "the token has no identity (sub)", grants)
    if not grants.room:
        raise Refusal(400, "the token names no room", grants)
    asked = request.query.get("room")
    if asked and asked != grants.room:
        raise Refusal(
            401, f"permissions denied: the token is for room {grants.room!r}, not {asked!r}", grants
        )
    if request.query.get("reconnect", "0").lower() not in FALSE_VALUES:
        raise Refusal(404, RESUME_NOT_SUPPORTED, grants)
    if grants.kind not in KINDS:
        raise Refusal(400, f"unknown participant kind {grants.kind!r} in the token", grants)
    if not media_addresses():
        raise Refusal(503, NO_MEDIA_ADDRESS, grants)
    auto = request.query.get("auto_subscribe", "1").lower() not in FALSE_VALUES
    try:
        client_protocol = int(request.query.get("client_protocol", "0"))
    except ValueError:
        raise Refusal(400, "client_protocol must be an integer", grants) from None
    return JoinSpec(grants, grants.room, auto, client_protocol)


class RtcEndpoint:
    """aiohttp handlers for /rtc, /rtc/validate and the refused /rtc/v1."""

    def __init__(
        self, keys: KeyStore, rooms: RoomSource, info: models.ServerInfo, config: ServerConfig
    ) -> None:
        self._keys = keys
        self._config = config
        self._rooms = rooms
        self._info = info
        self._sessions: set[SignalSession] = set()

    def install(self, app: web.Application) -> None:
        app.router.add_get("/rtc", self.handle)
        app.router.add_get("/rtc/validate", self.validate)
        app.router.add_get("/rtc/v1", self.not_v1)
        app.router.add_get("/rtc/v1/validate", self.not_v1)
        app.on_shutdown.append(self.on_shutdown)

    async def not_v1(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text=V1_NOT_SUPPORTED)

    async def validate(self, request: web.Request) -> web.Response:
        try:
            admit(self._keys, request)
        except Refusal as r:
            return web.Response(status=r.status, text=r.message)
        return web.Response(text="success")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = admit(self._keys, request)
        except Refusal as r:
            who = {"room": r.grants.room, "identity": r.grants.identity} if r.grants else {}
            log.info(
                "rtc join refused",
                extra={**who, "status": r.status, "reason": r.message, "peer": request.remote},
            )
            return web.Response(status=r.status, text=r.message)
        ws = web.WebSocketResponse(max_msg_size=MAX_SIGNAL_FRAME_BYTES)
        await ws.prepare(request)
        room = self._rooms.live_room(spec.room)
        session = SignalSession(ws, spec, room, self._info, self._config)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
        return ws

    async def on_shutdown(self, app: web.Application) -> None:
        for session in list(self._sessions):
            session.on_removed(models.SERVER_SHUTDOWN)


class SignalSession:
    """One client's signalling connection and its membership in the room."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        spec: JoinSpec,
        room: LiveRoom,
        info: models.ServerInfo,
        config: ServerConfig,
    ) -> None:
        self._ws = ws
        self._config = config
        self._spec = spec
        self._room = room
        self._server_info = info
        self._out: asyncio.Queue[rtc.SignalResponse | None] = asyncio.Queue()
        self._pending_tracks: dict[str, models.TrackInfo] = {}
        self._ending: str | None = None
        self._leave_reason: int = models.CLIENT_INITIATED
        g = spec.grants
        self._info = participant_info(
            g.identity,
            name=g.name,
            metadata=g.metadata,
            attributes=dict(g.attributes),
            kind=KINDS[g.kind],
            permission=spec.permission(),
        )
        self._info.client_protocol = spec.client_protocol
        self._participant: Participant | None = None
        self._peers = PeerConnections(
            self._send_offer, self._on_track, self._on_data, self._media_failed, self._flood
        )

    @property
    def log_fields(self) -> dict[str, object]:
        return {
            "room": self._spec.room,
            "identity": self._spec.grants.identity,
            "participant_sid": self._info.sid,
        }

    # -- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        p = self._participant = self._room.join(self._info, self, self._spec.auto_subscribe)
        self._send(rtc.SignalResponse(join=self._join_response(p)))
        tasks = [
            asyncio.create_task(self._write_task(), name=f"rtc-write-{p.sid}"),
            asyncio.create_task(self._offer_task(), name=f"rtc-offer-{p.sid}"),
        ]
        self._peers.renegotiate()  # the first offer: the server's data channels
        self._room.activate(p)
        reason = CLIENT_LEFT
        try:
            reason = await self._read_task()
        except SignalError as e:
            reason = str(e)
        finally:
            if self._ending:
                reason = self._ending
            self._room.leave(p, self._leave_reason)
            self._out.put_nowait(None)  # the writer flushes, then closes the WebSocket
            writer, offers = tasks
            offers.cancel()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await writer
            except (TimeoutError, ConnectionError):
                writer.cancel()
            await asyncio.gather(offers, return_exceptions=True)
            await self._peers.aclose()
            level = logging.INFO if reason == CLIENT_LEFT else logging.WARNING
            log.log(level, "rtc connection ended", extra={**self.log_fields, "reason": reason})

    def _fail(self, reason: str, leave_reason: int) -> None:
        """End this connection from outside the read loop: the writer closes the WebSocket."""
        if self._ending is None:
            self._ending = reason
            self._leave_reason = leave_reason
            self._out.put_nowait(None)

    def _flood(self, connection: str) -> None:
        log.warning(
            "ICE candidates dropped: too many for one negotiation",
            extra={**self.log_fields, "connection": connection},
        )

    def _media_failed(self, reason: str) -> None:
        self._fail(reason, models.MEDIA_FAILURE)

    async def _offer_task(self) -> None:
        try:
            await self._peers.offer_task(
                self._config.rtc_join_timeout, self._config.rtc_answer_timeout
            )
        except SignalError as e:
            if not self._peers.negotiated:  # livekit-server: JoinTimeout
                self._fail(str(e), models.JOIN_FAILURE)
                return
            # livekit-server: negotiation failed, the client is told to join again
            leave = rtc.LeaveRequest(
                can_reconnect=True,
                reason=models.SIGNAL_CLOSE,
                action=rtc.LeaveRequest.RECONNECT,
            )
            self._send(rtc.SignalResponse(leave=leave))
            self._fail(str(e), models.SIGNAL_CLOSE)

    async def _write_task(self) -> None:
        while True:
            msg = await self._out.get()
            if msg is None:
                await self._ws.close()
                return
            try:
                await self._ws.send_bytes(msg.SerializeToString())
            except ConnectionError:
                return

    def _send(self, msg: rtc.SignalResponse) -> None:
        self._out.put_nowait(msg)

    async def _read_task(self) -> str:
        while True:
            try:
                msg = await self._ws.receive(timeout=PING_TIMEOUT_S)
            except TimeoutError:
                self._leave_reason = models.SIGNAL_CLOSE
                return f"no message (nor ping) within {PING_TIMEOUT_S}s"
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return self._ending or "the client closed the signal connection"
            if msg.type == WSMsgType.ERROR:
                return f"signal connection error: {self._ws.exception()!r}"
            if msg.type != WSMsgType.BINARY:
                raise SignalError("a text frame: the signal protocol is binary protobuf")
            req = rtc.SignalRequest()
            try:
                req.ParseFromString(msg.data)
            except (DecodeError, RecursionError):
                raise SignalError("a frame that is not a SignalRequest") from None
            which = req.WhichOneof("message")
            if which is None:
                raise SignalError("a SignalRequest with no message")
            if which == "leave":
                return CLIENT_LEFT
            await self._handle(which, req)

    # -- requests -----------------------------------------------------------------------------

    async def _handle(self, which: str, req: rtc.SignalRequest) -> None:
        p = self._participant
        assert p is not None
        if which == "offer":
            tracks = [*self._pending_tracks.values(), *(x.info for x in p.publications.values())]
            fmtp = opus_format(
                dtx=not any(t.disable_dtx for t in tracks), stereo=any(t.stereo for t in tracks)
            )
            sdp = await self._peers.answer_publisher(req.offer.sdp, fmtp)
            answer = rtc.SessionDescription(type="answer", sdp=sdp, id=req.offer.id)
            self._send(rtc.SignalResponse(answer=answer))
            stopped = self._peers.stopped_mids()
            for pub in [x for x in p.publications.values() if x.info.mid in stopped]:
                log.info("track unpublished", extra={**self.log_fields, "track_sid": pub.info.sid})
                self._room.unpublish(p, pub.info.sid)
        elif which == "answer":
            await self._peers.accept_answer(req.answer.sdp)
        elif which == "trickle":
            await self._peers.add_candidate(
                req.trickle.candidateInit, req.trickle.target == rtc.SUBSCRIBER
            )
        elif which == "add_track":
            self._add_track(p, req.add_track)
        elif which == "mute":
            self._room.set_muted(p, req.mute.sid, req.mute.muted)
        elif which == "subscription":
            sids = list(req.subscription.track_sids)
            sids += [s for pt in req.subscription.participant_tracks for s in pt.track_sids]
            self._room.set_subscribed(p, sids, req.subscription.subscribe)
        elif which == "update_metadata":
            self._update_metadata(p, req.update_metadata)
        elif which == "ping":
            self._send(rtc.SignalResponse(pong=req.ping))
        elif which == "ping_req":
            pong = rtc.Pong(last_ping_timestamp=req.ping_req.timestamp, timestamp=_now_ms())
            self._send(rtc.SignalResponse(pong_resp=pong))

    def _add_track(self, p: Participant, req: rtc.AddTrackRequest) -> None:
        refusal = None
        if not p.info.permission.can_publish:
            refusal = "the token does not allow publishing"
        elif req.type != models.AUDIO:
            refusal = "callboard server relays audio only: video and data tracks are refused"
        if refusal is not None:
            log.warning(
                "track refused", extra={**self.log_fields, "cid": req.cid, "reason": refusal}
            )
            self._send(
                rtc.SignalResponse(
                    request_response=rtc.RequestResponse(
                        reason=rtc.RequestResponse.NOT_ALLOWED, message=refusal
                    )
                )
            )
            return
        track = models.TrackInfo(
            sid=new_id(TRACK_PREFIX),
            type=models.AUDIO,
            name=req.name,
            muted=req.muted,
            source=req.source,
            mime_type=OPUS_MIME,
            stereo=req.stereo,
            disable_dtx=req.disable_dtx,
            disable_red=True,
            stream=req.stream,
        )
        self._pending_tracks[req.cid] = track
        self._send(
            rtc.SignalResponse(track_published=rtc.TrackPublishedResponse(cid=req.cid, track=track))
        )

    def _update_metadata(self, p: Participant, req: rtc.UpdateParticipantMetadata) -> None:
        if not p.info.permission.can_update_metadata:
            log.info(
                "metadata update refused: no canUpdateOwnMetadata grant", extra=self.log_fields
            )
            return
        if req.name:
            p.info.name = req.name
        if req.metadata:
            p.info.metadata = req.metadata
        for key, value in req.attributes.items():
            if value:
                p.info.attributes[key] = value
            else:
                p.info.attributes.pop(key, None)
        self._room.update(p)

    def _join_response(self, p: Participant) -> rtc.JoinResponse:
        others = [o.info for o in self._room.visible_to(p)]
        info = models.ServerInfo()
        info.CopyFrom(self._server_info)
        info.version = PROTOCOL_VERSION
        return rtc.JoinResponse(
            room=self._room.info,
            participant=p.info,
            other_participants=others,
            server_version=PROTOCOL_VERSION,
            server_region=self._server_info.region,
            server_info=info,
            subscriber_primary=True,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
        )

    # -- media callbacks ----------------------------------------------------------------------

    def _send_offer(self, sdp: str) -> None:
        self._send(rtc.SignalResponse(offer=rtc.SessionDescription(type="offer", sdp=sdp)))

    def _on_track(
        self, cid: str, receiver: Any, payload_types: frozenset[int], mid: str | None
    ) -> None:
        p = self._participant
        track = self._pending_tracks.pop(cid, None)
        if track is None and self._pending_tracks:
            track = self._pending_tracks.pop(next(iter(self._pending_tracks)))
        if p is None or track is None:
            log.warning("a media track with no AddTrackRequest, ignored", extra=self.log_fields)
            return
        if mid:
            track.mid = mid
        pub = self._room.publish(p, track)
        tap_receiver(receiver, payload_types, pub.push, pub.audio_level.observe)

    def _on_data(self, payload: bytes, reliable: bool) -> None:
        p = self._participant
        if p is None:
            return
        if not p.info.permission.can_publish_data:
            log.info("data packet dropped: no canPublishData grant", extra=self.log_fields)
            return
        packet = models.DataPacket()
        try:
            packet.ParseFromString(payload)
        except (DecodeError, RecursionError):
            log.warning("unreadable data packet dropped", extra=self.log_fields)
            return
        self._room.send_data(p, packet, reliable)

    # -- Member -------------------------------------------------------------------------------

    def on_participants(self, updates: list[models.ParticipantInfo]) -> None:
        self._send(rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=updates)))

    def on_data(self, packet: models.DataPacket, reliable: bool) -> None:
        self._peers.send_data(packet.SerializeToString(), reliable)

    def subscribe(self, publisher: models.ParticipantInfo, track: models.TrackInfo) -> FrameSink:
        return self._peers.add_track(f"{publisher.sid}|{track.sid}", track.sid)

    def unsubscribe(self, track_sid: str) -> None:
        self._peers.remove_track(track_sid)

    def on_track_subscribed(self, track_sid: str) -> None:
        # livekit-agents' audio output waits for this before it plays anything
        self._send(rtc.SignalResponse(track_subscribed=rtc.TrackSubscribed(track_sid=track_sid)))

    def on_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        self._send(rtc.SignalResponse(speakers_changed=rtc.SpeakersChanged(speakers=speakers)))

    def on_room(self, info: models.Room) -> None:
        self._send(rtc.SignalResponse(room_update=rtc.RoomUpdate(room=info)))

    def on_removed(self, reason: int) -> None:
        self._ending = f"removed by the server ({models.DisconnectReason.Name(reason)})"
        self._leave_reason = reason
        leave = rtc.LeaveRequest(
            can_reconnect=False,
            reason=reason,  # type: ignore[arg-type]
            action=rtc.LeaveRequest.DISCONNECT,
        )
        self._send(rtc.SignalResponse(leave=leave))
        self._out.put_nowait(None)


def _now_ms() -> int:
    return int(time.time() * 1000)
