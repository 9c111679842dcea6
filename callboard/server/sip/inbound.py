"""One inbound call, in livekit-sip's order (pkg/sip/inbound.go): 100 Trying → trunk match and
digest auth → 180 Ringing → dispatch rule → room and participant (`sip.callStatus=ringing`) →
200 OK with the SDP answer once the room has subscribed → ACK → `active` → BYE or CANCEL →
`hangup` and the participant leaves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Final

from livekit.protocol import models, sip

from callboard.log import get_logger
from callboard.server.ids import new_id
from callboard.server.sip import prompts, rules, sdp, session_timer
from callboard.server.sip.codecs import Pcm
from callboard.server.sip.config import SipConfig
from callboard.server.sip.digest import DigestAuth, parse_credentials
from callboard.server.sip.headers import header_attributes
from callboard.server.sip.media import RtpSession
from callboard.server.sip.message import NameAddr, SipMessage, SipUri, reply
from callboard.server.sip.room_leg import CallRooms, RoomLeg
from callboard.server.sip.rules import ATTR_CALL_STATUS, InboundCall
from callboard.server.sip.store import CALL_PREFIX, SipStore
from callboard.server.sip.transport import Peer
from callboard.server.sip.uac import ClientTransactions, new_branch

log = get_logger("server.sip.call")

ALLOW: Final = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE"
NO_TRUNK: Final = "Does not match any SIP Trunks"
NO_RULE: Final = "Does not match Trunks or Dispatch Rules"
PIN_LIMIT: Final = 16
"""livekit-sip pinPrompt `pinLimit`: a longer pin is wrong."""


class CallStatus(enum.StrEnum):
    """`sip.callStatus` values (livekit-sip pkg/sip/participant.go CallStatus.Attribute)."""

    DIALING = "dialing"
    RINGING = "ringing"
    ACTIVE = "active"
    HANGUP = "hangup"


class Refused(Exception):
    """The INVITE gets this final response and the call ends."""

    def __init__(self, status: int, reason: str = "", extra: dict[str, str] | None = None):
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.extra = status, reason, extra or {}


Responder = Callable[[SipMessage], None]


class InboundSipCall:
    """The life of one INVITE dialog on the gateway."""

    def __init__(
        self,
        invite: SipMessage,
        peer: Peer,
        *,
        config: SipConfig,
        store: SipStore,
        auth: DigestAuth,
        rooms: CallRooms,
        respond: Responder,
        contact: str,
        client: ClientTransactions,
    ) -> None:
        self.invite = invite
        self.peer = peer
        self.config = config
        self.store = store
        self.auth = auth
        self.rooms = rooms
        self._respond = respond
        self.contact = contact
        self.client = client
        self._background: set[asyncio.Task[None]] = set()
        self.call_id = new_id(CALL_PREFIX)
        self.local_tag = new_id("")
        self.media: RtpSession | None = None
        self.leg: RoomLeg | None = None
        self.answer: sdp.Answer | None = None
        self.acked = asyncio.Event()
        self.ended = asyncio.Event()
        self.status = "incoming"
        self.room_name = ""
        self.identity = ""
        self._cseq = 0
        self._pin_digits: asyncio.Queue[str] = asyncio.Queue(maxsize=PIN_LIMIT + 2)
        self.timer: session_timer.SessionTimer | None = None
        self.refreshed = asyncio.Event()
        """Set by each refresh from the caller (re-INVITE or UPDATE)."""
        self._timer_task: asyncio.Task[None] | None = None
        self._sdp_version = 1
        self.log_extra = {"call_id": self.call_id, "sip_call_id": invite.call_id}

    def respond(
        self,
        status: int,
        reason: str = "",
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        response = reply(self.invite, status, reason, to_tag=self.local_tag if status > 100 else "")
        if status >= 180:
            response.add("Contact", self.contact)
        for name, value in (headers or {}).items():
            response.add(name, value)
        if body:
            response.add("Content-Type", "application/sdp")
        response.body = body
        self._respond(response)

    def _inbound(self) -> InboundCall:
        from_, to = self.invite.from_, self.invite.to
        return InboundCall(
            call_id=self.call_id,
            from_user=from_.uri.user,
            from_host=from_.uri.host,
            to_user=to.uri.user or SipUri.parse(self.invite.uri).user,
            source_ip=self.peer.host,
        )

    async def run(self) -> None:
        """Answer the INVITE, then hold the call until it ends."""
        try:
            await self._setup()
        except Refused as e:
            log.info(
                "sip call refused",
                extra={**self.log_extra, "status": e.status, "reason": e.reason},
            )
            self.respond(e.status, e.reason, headers=e.extra)
            await self._close(models.DisconnectReason.USER_REJECTED)
            return
        except asyncio.CancelledError:
            await self._close(models.DisconnectReason.CLIENT_INITIATED)
            raise
        await self.ended.wait()

    async def _setup(self) -> None:
        self.respond(100)
        try:
            self.timer = session_timer.negotiate(self.invite, self.config.min_session_expires)
        except session_timer.IntervalTooSmall as e:
            raise Refused(422, "Session Interval Too Small", {"Min-SE": str(e)}) from None
        call = self._inbound()
        trunk = self._trunk(call)
        try:
            offer = sdp.parse(self.invite.body)
        except sdp.SdpError as e:
            raise Refused(488, str(e)) from None
        self.respond(180)
        dispatch = self._dispatch(trunk, call)
        self.media = RtpSession(self._caller_audio, self.caller_digit)
        port = await self.media.open(self.config.host)
        try:
            self.answer = sdp.choose(offer, self.config.host, port)
        except sdp.SdpError as e:
            raise Refused(488, str(e)) from None
        remote = (offer.address, offer.port)
        pin_entered = dispatch.request_pin
        if pin_entered:
            # livekit-sip answers first so that it can prompt and hear the digits
            self.media.start(self.answer, remote)
            self._accept()
            entered = await self._pin_prompt(trunk, call)
            if entered is None:
                return
            dispatch = entered
        headers = header_attributes(
            self.invite, dispatch.headers_to_attributes, dispatch.include_headers
        )
        status = CallStatus.ACTIVE if pin_entered else CallStatus.RINGING
        attrs = {**dispatch.attributes, **headers, ATTR_CALL_STATUS: status.value}
        dispatch = dataclasses.replace(dispatch, attributes=attrs)
        self.leg = await self.rooms.join(dispatch, self._digit_to_caller, self._removed)
        self.media.source = self.leg.next_frame
        self.room_name, self.identity = dispatch.room_name, dispatch.identity
        self.log_extra.update(room=dispatch.room_name, identity=dispatch.identity)
        if pin_entered:
            log.info("sip call joined its room after the pin", extra=self.log_extra)
            return
        log.info("sip call ringing", extra=self.log_extra)
        if not await self.leg.wait_subscribed(self.config.ringing_timeout):
            raise Refused(480, "Nobody subscribed to the call")
        self._accept()
        # no early media: livekit-sip enables output once it has answered (acceptCall)
        self.media.start(self.answer, remote)
        self.leg.set_attributes({ATTR_CALL_STATUS: CallStatus.ACTIVE.value})
        log.info("sip call answered", extra={**self.log_extra, "heard_by": self.leg.subscribers()})

    def _accept(self) -> None:
        assert self.answer is not None
        headers = {"Allow": ALLOW, **(self.timer.headers() if self.timer else {})}
        self.respond(200, body=self.answer.encode(), headers=headers)
        self.status = CallStatus.ACTIVE.value
        if self.timer is not None:
            self._timer_task = asyncio.get_running_loop().create_task(
                self._session_timer_task(self.timer), name="sip-session-timer"
            )

    async def _session_timer_task(self, timer: session_timer.SessionTimer) -> None:
        """RFC 4028: when we refresh, a re-INVITE half way through each interval (BYE if it
        fails); when the caller does, BYE once an interval passes without its refresh."""
        while self.status == CallStatus.ACTIVE.value:
            if timer.we_refresh:
                await asyncio.sleep(timer.refresh_after)
                if self.status == CallStatus.ACTIVE.value and not await self._refresh(timer):
                    await self.bye("session refresh failed")
                continue
            self.refreshed.clear()
            try:
                await asyncio.wait_for(self.refreshed.wait(), timer.expires_after)
            except TimeoutError:
                log.info("sip session expired", extra=self.log_extra)
                await self.bye("session expired")

    async def _refresh(self, timer: session_timer.SessionTimer) -> bool:
        """A session refresh (RFC 4028 §7.4): a re-INVITE offering our SDP again."""
        assert self.answer is not None
        request = self._in_dialog("INVITE")
        request.add("Session-Expires", f"{timer.interval};refresher={session_timer.UAS}")
        request.add("Supported", "timer")
        request.add("Content-Type", "application/sdp")
        self._sdp_version += 1
        request.body = self.answer.encode(version=self._sdp_version)
        response = await self.client.request(request, self.peer.send, reliable=self._reliable)
        if not 200 <= response.status < 300:
            log.info(
                "sip session refresh refused",
                extra={**self.log_extra, "status": response.status},
            )
            return False
        self.peer.send(self._in_dialog("ACK", cseq=self._cseq).encode())
        return True

    @property
    def _reliable(self) -> bool:
        return self.peer.transport != "UDP"

    async def _pin_prompt(
        self, trunk: sip.SIPInboundTrunkInfo, call: InboundCall
    ) -> rules.Dispatch | None:
        """livekit-sip `pinPrompt`: prompt, gather digits up to `#` (at most PIN_LIMIT), and
        evaluate the rules again with that pin (`no_pin` for none). A wrong pin gets its prompt
        and a BYE. None when the call is over (refused, or the caller hung up)."""
        log.info("sip call asks for a pin", extra=self.log_extra)
        await self._prompt(prompts.ENTER_PIN)
        pin = ""
        deadline = asyncio.get_running_loop().time() + self.config.ringing_timeout
        while (digit := await self._next_digit(deadline)) is not None:
            if digit == "#":
                entered = dataclasses.replace(call, pin=pin, no_pin=not pin)
                try:
                    dispatch = self._dispatch(trunk, entered)
                except Refused:
                    break
                await self._prompt(prompts.ROOM_JOIN)
                return dispatch if self.status == CallStatus.ACTIVE.value else None
            pin += digit
            if len(pin) > PIN_LIMIT:
                break
        if self.status == CallStatus.HANGUP.value:
            return None
        log.info("sip call refused: wrong pin", extra=self.log_extra)
        await self._prompt(prompts.WRONG_PIN)
        await self.bye("wrong pin")
        return None

    async def _prompt(self, pcm: Pcm) -> None:
        """Play `pcm` to the caller and wait until it has been sent (paced at 20 ms a frame)."""
        assert self.media is not None
        self.media.play(pcm)
        await asyncio.sleep(prompts.seconds(pcm))

    async def _next_digit(self, deadline: float) -> str | None:
        """The caller's next digit; None once the call ended or `deadline` passed."""
        loop = asyncio.get_running_loop()
        digit = asyncio.ensure_future(self._pin_digits.get())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait(
                (digit, ended),
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            digit.cancel()
            ended.cancel()
        return digit.result() if digit in done else None

    def _trunk(self, call: InboundCall) -> sip.SIPInboundTrunkInfo:
        try:
            trunk = rules.match_trunk(self.store.inbound.values(), call)
        except rules.RuleError:
            raise Refused(503, "Try again later") from None
        if trunk is None:
            raise Refused(404, NO_TRUNK)
        if trunk.auth_username and trunk.auth_password:
            self._check_digest(trunk.auth_username, trunk.auth_password, trunk.auth_realm)
        self.log_extra["trunk_id"] = trunk.sip_trunk_id
        return trunk

    def _check_digest(self, username: str, password: str, realm: str) -> None:
        realm = realm or self.config.realm
        header = self.invite.get("Proxy-Authorization")
        if not header:
            raise Refused(407, "Unauthorized", {"Proxy-Authenticate": self.auth.challenge(realm)})
        if not parse_credentials(header):
            raise Refused(401, "Bad credentials")
        if not self.auth.check(
            header, method="INVITE", username=username, password=password, realm=realm
        ):
            raise Refused(401, "Unauthorized")

    def _dispatch(self, trunk: sip.SIPInboundTrunkInfo, call: InboundCall) -> rules.Dispatch:
        try:
            rule = rules.match_dispatch_rule(trunk, self.store.rules.values(), call)
            dispatch = rules.evaluate_dispatch_rule(trunk, rule, call)
        except rules.RuleError:
            raise Refused(404, NO_RULE) from None
        return dispatch

    # -- media between the phone and the room ------------------------------------------------

    def _caller_audio(self, pcm: Pcm) -> None:
        if self.leg is not None:
            self.leg.caller_audio(pcm)

    def caller_digit(self, digit: str) -> None:
        """A digit from the phone: to the room once the caller is in it, else to the PIN."""
        if self.leg is not None:
            self.leg.caller_digit(digit)
        else:
            with contextlib.suppress(asyncio.QueueFull):
                self._pin_digits.put_nowait(digit)

    def _removed(self, reason: int) -> None:
        """The room ended the caller's membership (RemoveParticipant, room closed): hang up."""
        if self.leg is not None and self.status != CallStatus.HANGUP.value:
            task = asyncio.get_running_loop().create_task(self.bye("removed from the room"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _digit_to_caller(self, digit: str) -> None:
        if self.media is not None:
            self.media.send_digit(digit)

    # -- requests we send in the caller's dialog --------------------------------------------

    def _in_dialog(self, method: str, cseq: int | None = None) -> SipMessage:
        """A request from our side of the dialog (RFC 3261 §12.2.1.1): From is the INVITE's
        To with our tag, To its From, sent to the caller's Contact; the next CSeq unless
        given (an ACK takes its INVITE's)."""
        target = remote_target(self.invite)
        uri = str(target.uri) if target is not None else str(self.invite.from_.uri)
        if cseq is None:
            self._cseq += 1
        msg = SipMessage(method=method, uri=uri)
        via = f"SIP/2.0/{self.peer.transport} {self.config.host}:{self.contact_port}"
        msg.add("Via", f"{via};branch={new_branch()};rport")
        msg.add("From", f"{self.invite.get('To')};tag={self.local_tag}")
        msg.add("To", self.invite.get("From"))
        msg.add("Call-ID", self.invite.call_id)
        msg.add("CSeq", f"{self._cseq if cseq is None else cseq} {method}")
        msg.add("Contact", self.contact)
        msg.add("Max-Forwards", "70")
        return msg

    @property
    def contact_port(self) -> int:
        return NameAddr.parse(self.contact).uri.port or self.config.port

    async def refer(self, refer_to: str) -> SipMessage:
        """Blind transfer (RFC 3515): ask the caller's side to call `refer_to`."""
        request = self._in_dialog("REFER")
        request.add("Refer-To", refer_to)
        request.add("Referred-By", self.contact)
        log.info("sip transfer", extra=self.log_extra)
        return await self.client.request(request, self.peer.send, reliable=self._reliable)

    async def bye(self, reason: str) -> None:
        """We hang up: BYE, then the participant leaves the room."""
        request = self._in_dialog("BYE")
        request.add("Reason", f'SIP;cause=200;text="{reason}"')
        await self.client.request(request, self.peer.send, reliable=self._reliable)
        await self.hang_up(models.DisconnectReason.CLIENT_INITIATED)

    # -- endings -----------------------------------------------------------------------------

    async def hang_up(self, reason: int) -> None:
        """The caller hung up (BYE) or cancelled: leave the room and free the media."""
        await self._close(reason)
        self.ended.set()

    async def _close(self, reason: int) -> None:
        if self.status == CallStatus.HANGUP.value:
            return
        self.status = CallStatus.HANGUP.value
        task = self._timer_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if self.media is not None:
            self.media.close()
        if self.leg is not None:
            self.leg.set_attributes({ATTR_CALL_STATUS: CallStatus.HANGUP.value})
            await self.leg.leave(reason)
        log.info(
            "sip call ended",
            extra={**self.log_extra, "reason": int(reason), **self._media_stats()},
        )

    def _media_stats(self) -> dict[str, int]:
        """RTP counters for the log line that closes the call."""
        if self.media is None:
            return {}
        return {
            "rtp_received": self.media.received,
            "rtp_dropped": self.media.dropped,
            "rtp_lost": self.media.lost,
            "rtp_sent": self.media.sent,
        }


def remote_target(invite: SipMessage) -> NameAddr | None:
    contact = invite.get("Contact")
    try:
        return NameAddr.parse(contact) if contact else None
    except ValueError:
        return None
