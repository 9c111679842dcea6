"""Calls the gateway places (`CreateSIPParticipant`) and transfers (`TransferSIPParticipant`):
only through a stored outbound trunk — no open relay — with the participant in the room going
`dialing` → `active` → `hangup` (livekit-sip pkg/sip/outbound.go)."""

from __future__ import annotations

import asyncio
from typing import Final

from livekit.protocol import models, sip

from callboard.log import get_logger
from callboard.server.ids import new_id
from callboard.server.sip import sdp
from callboard.server.sip.codecs import Pcm
from callboard.server.sip.config import SipConfig
from callboard.server.sip.inbound import CallStatus
from callboard.server.sip.media import RtpSession
from callboard.server.sip.message import SipMessage
from callboard.server.sip.room_leg import CallRooms, RoomLeg
from callboard.server.sip.rules import (
    ATTR_CALL_ID,
    ATTR_CALL_STATUS,
    ATTR_PHONE_NUMBER,
    ATTR_TRUNK_ID,
    Dispatch,
)
from callboard.server.sip.store import CALL_PREFIX
from callboard.server.sip.uac import ClientTransactions, DialTarget, OutgoingDialog, Send
from callboard.server.twirp import TwirpError

log = get_logger("server.sip.outbound")

DEFAULT_SIP_PORT: Final = 5060


class DialFailed(TwirpError):
    """The callee did not answer: livekit's error with the SIP status in its meta."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(
            "unavailable",
            f"sip status: {status}: {reason}",
            {"sip_status_code": str(status), "sip_status": reason},
        )


def trunk_address(trunk: sip.SIPOutboundTrunkInfo) -> tuple[str, int]:
    """host and port of an outbound trunk's `address` (5060 when it names none)."""
    host, _, port = trunk.address.rpartition(":")
    if not host or not port.isdigit():
        return trunk.address, DEFAULT_SIP_PORT
    return host, int(port)


class OutboundSipCall:
    """One callee dialled through an outbound trunk into a room."""

    def __init__(
        self,
        req: sip.CreateSIPParticipantRequest,
        trunk: sip.SIPOutboundTrunkInfo,
        *,
        config: SipConfig,
        rooms: CallRooms,
        transactions: ClientTransactions,
        send: Send,
        local_port: int,
    ) -> None:
        host, port = trunk_address(trunk)
        self.req, self.trunk, self.config, self.rooms = req, trunk, config, rooms
        number = req.sip_number or (trunk.numbers[0] if trunk.numbers else "")
        self.target = DialTarget(
            host=host,
            port=port,
            to_user=req.sip_call_to,
            from_user=number,
            transport="TCP" if trunk.transport == sip.SIP_TRANSPORT_TCP else "UDP",
            username=trunk.auth_username,
            password=trunk.auth_password,
            from_host=trunk.from_host,
            display_name=req.display_name,
            headers=dict(req.headers),
        )
        self.dialog = OutgoingDialog(self.target, transactions, send, (config.host, local_port))
        self.call_id = new_id(CALL_PREFIX)
        self.identity = req.participant_identity or f"sip_{req.sip_call_to}"
        self.media = RtpSession(self._callee_audio, self._callee_digit)
        self.leg: RoomLeg | None = None
        self.answer: sdp.Answer | None = None
        self.acked = asyncio.Event()
        self.ended = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.status = CallStatus.DIALING.value
        self.log_extra = {
            "call_id": self.call_id,
            "room": req.room_name,
            "trunk_id": trunk.sip_trunk_id,
        }

    @property
    def local_tag(self) -> str:
        return self.dialog.local_tag

    @property
    def sip_call_id(self) -> str:
        return self.dialog.call_id

    def _dispatch(self) -> Dispatch:
        attrs = {
            **self.req.participant_attributes,
            ATTR_CALL_ID: self.call_id,
            ATTR_TRUNK_ID: self.trunk.sip_trunk_id,
            ATTR_CALL_STATUS: CallStatus.DIALING.value,
        }
        if not self.req.hide_phone_number:
            attrs[ATTR_PHONE_NUMBER] = self.req.sip_call_to
        return Dispatch(
            trunk_id=self.trunk.sip_trunk_id,
            rule_id="",
            request_pin=False,
            room_name=self.req.room_name,
            identity=self.identity,
            name=self.req.participant_name or f"Phone {self.req.sip_call_to}",
            metadata=self.req.participant_metadata,
            attributes=attrs,
        )

    async def join(self) -> None:
        """Join the room as `dialing` (what CreateSIPParticipant waits for by default)."""
        self.leg = await self.rooms.join(self._dispatch(), self.media.send_digit, self._removed)
        self.media.source = self.leg.next_frame
        log.info("sip dialing", extra=self.log_extra)

    async def dial(self) -> SipMessage:
        """INVITE the callee; on 2xx start media and go `active`."""
        port = await self.media.open(self.config.host)
        offer = sdp.offer(self.config.host, port)
        response = await self.dialog.invite(offer)
        if not 200 <= response.status < 300:
            await self.end(models.DisconnectReason.USER_UNAVAILABLE)
            return response
        try:
            answer = sdp.parse(response.body)
            self.answer = sdp.choose(answer, self.config.host, port)
        except sdp.SdpError:
            await self.dialog.bye()
            await self.end(models.DisconnectReason.USER_UNAVAILABLE)
            return SipMessage(status=488, reason="Not Acceptable Here")
        self.media.start(self.answer, (answer.address, answer.port))
        self.acked.set()
        self.status = CallStatus.ACTIVE.value
        if self.leg is not None:
            self.leg.set_attributes({ATTR_CALL_STATUS: CallStatus.ACTIVE.value})
        log.info("sip callee answered", extra=self.log_extra)
        return response

    def _callee_audio(self, pcm: Pcm) -> None:
        if self.leg is not None:
            self.leg.caller_audio(pcm)

    def _callee_digit(self, digit: str) -> None:
        if self.leg is not None:
            self.leg.caller_digit(digit)

    def _removed(self, reason: int) -> None:
        """The room ended the callee's membership: hang up on them."""
        if self.status == CallStatus.HANGUP.value:
            return
        task = asyncio.get_running_loop().create_task(self._hang_up_callee(reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hang_up_callee(self, reason: int) -> None:
        if self.status == CallStatus.ACTIVE.value:
            await self.dialog.bye("removed from the room")
        await self.end(reason)

    def caller_digit(self, digit: str) -> None:
        self._callee_digit(digit)

    async def hang_up(self, reason: int) -> None:
        """The callee hung up (BYE)."""
        await self.end(reason)

    async def end(self, reason: int) -> None:
        if self.status == CallStatus.HANGUP.value:
            return
        self.status = CallStatus.HANGUP.value
        self.media.close()
        if self.leg is not None:
            self.leg.set_attributes({ATTR_CALL_STATUS: CallStatus.HANGUP.value})
            await self.leg.leave(reason)
        self.ended.set()
        log.info("sip outbound call ended", extra={**self.log_extra, "reason": int(reason)})
