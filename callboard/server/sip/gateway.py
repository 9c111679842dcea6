"""The SIP user agent of `callboard server`: routes each request to its call, keeps server
transactions for retransmissions (RFC 3261 §17.2), retransmits final INVITE responses over UDP
until ACK, and sheds load (503) before it runs out of anything."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from livekit.protocol import models, sip

from callboard.log import get_logger
from callboard.server.ids import new_id
from callboard.server.sip import sdp
from callboard.server.sip.config import T1_S, T2_S, TRANSACTION_LIFETIME_S, SipConfig
from callboard.server.sip.digest import DigestAuth
from callboard.server.sip.inbound import ALLOW, InboundSipCall
from callboard.server.sip.message import (
    REASONS,
    SipMessage,
    SipParseError,
    UnsupportedVersion,
    canonical,
    reply,
)
from callboard.server.sip.outbound import DialFailed, OutboundSipCall, trunk_address
from callboard.server.sip.room_leg import CallRooms
from callboard.server.sip.store import SipStore
from callboard.server.sip.transport import Peer, SipTransports
from callboard.server.sip.uac import ClientTransactions
from callboard.server.twirp import TwirpError

log = get_logger("server.sip")

RETRY_AFTER_S: Final = 5
SUPPORTED: Final = frozenset({"replaces", "norefersub", "100rel", "timer"})
GARBAGE_LOG_INTERVAL_S: Final = 10.0


@dataclass
class _Transaction:
    """What we last answered to one request, for its retransmissions."""

    expires: float
    response: bytes = b""


class TokenBucket:
    """`rate` tokens a second, at most `rate` saved."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class SipGateway:
    """Listens for SIP, places calls into rooms through `rooms`."""

    def __init__(self, config: SipConfig, store: SipStore, rooms: CallRooms) -> None:
        self.config = config
        self.store = store
        self.rooms = rooms
        self.auth = DigestAuth()
        self.transports = SipTransports(config.host, config.port, self._on_message, self._refused)
        self._transactions: OrderedDict[tuple[str, str], _Transaction] = OrderedDict()
        self.calls: dict[tuple[str, str], InboundSipCall | OutboundSipCall] = {}
        """Dialogs by (Call-ID, our tag)."""
        self._by_branch: dict[str, InboundSipCall] = {}
        self._acked: dict[tuple[str, str], asyncio.Event] = {}
        self._call_tasks: dict[InboundSipCall, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._invites = TokenBucket(config.invites_per_second)
        self.client = ClientTransactions()
        self.outbound: dict[tuple[str, str], OutboundSipCall] = {}
        """Calls we placed, by (room, participant identity)."""
        self.refused_messages = 0
        self.shed = 0
        self._garbage_logged_at = self._shed_logged_at = -GARBAGE_LOG_INTERVAL_S

    @property
    def port(self) -> int:
        return self.transports.port

    @property
    def contact(self) -> str:
        return f"<sip:{self.config.host}:{self.port}>"

    async def start(self) -> None:
        await self.transports.start()

    async def aclose(self) -> None:
        for call in list(self.calls.values()):
            await call.hang_up(models.DisconnectReason.SERVER_SHUTDOWN)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transports.aclose()

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, msg: SipMessage, peer: Peer) -> None:
        if not msg.is_request:
            self.client.on_response(msg)  # ours to match, or a stray one dropped
            return
        self._expire_transactions()
        method = msg.method.upper()
        branch = msg.vias[0].branch
        key = (branch, "INVITE" if method == "ACK" else method)
        if method == "ACK":
            self._on_ack(msg, key)
            return
        known = self._transactions.get(key)
        if known is not None:
            if known.response:
                peer.send(known.response)  # a retransmitted request: the same answer again
            return
        if len(self._transactions) >= self.config.max_transactions:
            self._send(msg, peer, self._overloaded(msg))
            return
        self._transactions[key] = _Transaction(time.monotonic() + TRANSACTION_LIFETIME_S)
        handler = {
            "INVITE": self._on_invite,
            "BYE": self._on_bye,
            "CANCEL": self._on_cancel,
            "OPTIONS": self._on_options,
            "INFO": self._on_info,
            "UPDATE": self._on_update,
        }.get(method, self._on_unsupported)
        handler(msg, peer)

    def _send(self, request: SipMessage, peer: Peer, response: SipMessage) -> None:
        """Send and remember a response to `request` (its retransmissions get it again)."""
        data = response.encode()
        branch = request.vias[0].branch
        known = self._transactions.get((branch, request.method.upper()))
        if known is not None:
            known.response = data
        peer.send(data)
        if request.method.upper() == "INVITE" and response.status >= 200:
            self._retransmit_until_ack(request, peer, data)

    def _overloaded(self, msg: SipMessage) -> SipMessage:
        response = reply(msg, 503, "Try again later")
        response.add("Retry-After", str(RETRY_AFTER_S))
        return response

    def _on_invite(self, msg: SipMessage, peer: Peer) -> None:
        if msg.to.tag:
            self._on_reinvite(msg, peer)
            return
        unsupported = [
            tag for tag in msg.get_all("Require") if tag.strip().lower() not in SUPPORTED
        ]
        if unsupported:
            response = reply(msg, 420)
            response.add("Unsupported", ", ".join(unsupported))
            self._send(msg, peer, response)
            return
        if len(self._by_branch) >= self.config.max_calls or not self._invites.take():
            self.shed += 1
            now = time.monotonic()
            if now - self._shed_logged_at > GARBAGE_LOG_INTERVAL_S:
                self._shed_logged_at = now
                log.warning(
                    "sip invites refused with 503: overloaded",
                    extra={"peer": peer.host, "calls": len(self._by_branch), "shed": self.shed},
                )
            self._send(msg, peer, self._overloaded(msg))
            return
        branch = msg.vias[0].branch
        call = InboundSipCall(
            msg,
            peer,
            config=self.config,
            store=self.store,
            auth=self.auth,
            rooms=self.rooms,
            respond=lambda response: self._send(msg, peer, response),
            contact=self.contact,
            client=self.client,
        )
        self._by_branch[branch] = call
        self.calls[(msg.call_id, call.local_tag)] = call
        task = asyncio.get_running_loop().create_task(self._run(call, branch), name="sip-call")
        self._tasks.add(task)
        self._call_tasks[call] = task
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: InboundSipCall, branch: str) -> None:
        try:
            await call.run()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("sip call failed", extra=call.log_extra)
            call.respond(500)
            await call.hang_up(models.DisconnectReason.UNKNOWN_REASON)
        finally:
            self._call_tasks.pop(call, None)
            self._by_branch.pop(branch, None)
            self.calls.pop((call.invite.call_id, call.local_tag), None)

    def _on_reinvite(self, msg: SipMessage, peer: Peer) -> None:
        """A re-INVITE (hold, resume, a new media address, session refresh): answered with
        the same SDP in the direction the offer allows; the media follows it."""
        call = self.calls.get((msg.call_id, msg.to.tag))
        if call is None or call.answer is None:
            self._send(msg, peer, reply(msg, 481))
            return
        answer = call.answer
        if msg.body:
            try:
                offer = sdp.parse(msg.body)
            except sdp.SdpError:
                self._send(msg, peer, reply(msg, 488))
                return
            answer = dataclasses.replace(answer, direction=sdp.answer_direction(offer.direction))
            call.answer = answer
            self._update_media(call, answer, (offer.address, offer.port))
        response = self._refreshed(call, msg)
        response.add("Content-Type", "application/sdp")
        response.body = answer.encode(version=2)
        self._send(msg, peer, response)

    def _refreshed(self, call: InboundSipCall | OutboundSipCall, msg: SipMessage) -> SipMessage:
        """A 200 OK to a re-INVITE or UPDATE, which also refreshes the session (RFC 4028)."""
        response = reply(msg, 200)
        response.add("Contact", self.contact)
        if isinstance(call, InboundSipCall):
            call.refreshed.set()
            if call.timer is not None:
                for name, value in call.timer.headers().items():
                    response.add(name, value)
        return response

    def _on_update(self, msg: SipMessage, peer: Peer) -> None:
        """UPDATE without an offer (RFC 3311), as callers refresh sessions (RFC 4028)."""
        call = self.calls.get((msg.call_id, msg.to.tag))
        if call is None:
            self._send(msg, peer, reply(msg, 481))
            return
        if msg.body:
            self._send(msg, peer, reply(msg, 488, "Offers in UPDATE are not supported"))
            return
        self._send(msg, peer, self._refreshed(call, msg))

    def _update_media(
        self,
        call: InboundSipCall | OutboundSipCall,
        answer: sdp.Answer,
        remote: tuple[str, int],
    ) -> None:
        media = call.media
        if media is None:
            return
        was_sending = media.sending
        media.update(answer, remote)
        if media.sending != was_sending:
            message = "sip call resumed" if media.sending else "sip call on hold"
            log.info(message, extra={**call.log_extra, "direction": answer.direction})

    def _on_ack(self, msg: SipMessage, key: tuple[str, str]) -> None:
        call = self.calls.get((msg.call_id, msg.to.tag))
        if call is not None:
            call.acked.set()
        known = self._transactions.get(key)
        if known is not None:
            known.response = b""  # a non-2xx final response: stop retransmitting it
        acked = self._acked.get(key)
        if acked is not None:
            acked.set()

    def _on_bye(self, msg: SipMessage, peer: Peer) -> None:
        call = self.calls.get((msg.call_id, msg.to.tag))
        if call is None:
            self._send(msg, peer, reply(msg, 481, "Call does not exist"))
            return
        self._send(msg, peer, reply(msg, 200))
        call.acked.set()
        self._spawn(call.hang_up(models.DisconnectReason.CLIENT_INITIATED))

    def _on_cancel(self, msg: SipMessage, peer: Peer) -> None:
        call = self._by_branch.get(msg.vias[0].branch)
        if call is None or call.status != "incoming":
            self._send(msg, peer, reply(msg, 481))
            return
        self._send(msg, peer, reply(msg, 200))
        call.respond(487)
        task = self._call_tasks.get(call)
        if task is not None:
            task.cancel()  # run() leaves the room on its way out

    def _on_options(self, msg: SipMessage, peer: Peer) -> None:
        response = reply(msg, 200)
        response.add("Allow", ALLOW)
        response.add("Accept", "application/sdp")
        self._send(msg, peer, response)

    def _on_info(self, msg: SipMessage, peer: Peer) -> None:
        """SIP INFO DTMF (application/dtmf-relay `Signal=5`), as some trunks send it."""
        call = self.calls.get((msg.call_id, msg.to.tag))
        if call is None:
            self._send(msg, peer, reply(msg, 481))
            return
        for line in msg.body.decode("utf-8", errors="replace").splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == "signal" and value.strip():
                call.caller_digit(value.strip()[:1])
        self._send(msg, peer, reply(msg, 200))

    def _on_unsupported(self, msg: SipMessage, peer: Peer) -> None:
        response = reply(msg, 405)
        response.add("Allow", ALLOW)
        self._send(msg, peer, response)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="sip-call-end")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- calls we place (CallControl for the livekit.SIP service) ----------------------------

    async def create_participant(
        self, req: sip.CreateSIPParticipantRequest, trunk: sip.SIPOutboundTrunkInfo | None
    ) -> sip.SIPParticipantInfo:
        """Dial `req.sip_call_to` through the stored outbound trunk into `req.room_name`."""
        if trunk is None:
            raise TwirpError(
                "failed_precondition",
                "callboard dials only through a stored outbound trunk: set sip_trunk_id",
            )
        call = OutboundSipCall(
            req,
            trunk,
            config=self.config,
            rooms=self.rooms,
            transactions=self.client,
            send=await self._sender(trunk),
            local_port=self.port,
        )
        await call.join()
        self.calls[(call.sip_call_id, call.local_tag)] = call
        self.outbound[(req.room_name, call.identity)] = call
        answered: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._spawn(self._dial(call, answered))
        if req.wait_until_answered:
            response = await asyncio.shield(answered)
            if not 200 <= response.status < 300:
                raise DialFailed(response.status, response.reason)
        return sip.SIPParticipantInfo(
            participant_id=new_id("PA_"),
            participant_identity=call.identity,
            room_name=req.room_name,
            sip_call_id=call.call_id,
        )

    async def _sender(self, trunk: sip.SIPOutboundTrunkInfo) -> Callable[[bytes], None]:
        """How requests reach the trunk: from our UDP socket, or over a TCP connection."""
        host, port = trunk_address(trunk)
        if trunk.transport in (sip.SIP_TRANSPORT_AUTO, sip.SIP_TRANSPORT_UDP):
            return lambda data: self.transports.send_udp(data, host, port)
        if trunk.transport != sip.SIP_TRANSPORT_TCP:
            raise TwirpError("unimplemented", "outbound calls use UDP or TCP (no TLS)")
        try:
            return await self.transports.connect(host, port)
        except (OSError, TimeoutError) as e:
            raise TwirpError("unavailable", f"cannot reach {host}:{port} over TCP: {e}") from None

    async def _dial(self, call: OutboundSipCall, answered: asyncio.Future[SipMessage]) -> None:
        """Dial, say how it went on `answered`, then hold the call until it ends."""
        try:
            response = await call.dial()
            answered.set_result(response)
            if 200 <= response.status < 300:
                await call.ended.wait()
        except Exception as e:
            if not answered.done():
                answered.set_exception(e)
            raise
        finally:
            self.calls.pop((call.sip_call_id, call.local_tag), None)
            self.outbound.pop((call.req.room_name, call.identity), None)

    async def transfer_participant(
        self, req: sip.TransferSIPParticipantRequest
    ) -> sip.TransferSIPParticipantResponse:
        """REFER the caller to `transfer_to`; on 202 the transfer is under way and we hang up."""
        call = self._find_participant(req.room_name, req.participant_identity)
        if call is None:
            raise TwirpError("not_found", "requested sip participant does not exist")
        response = await call.refer(req.transfer_to)
        transfer_id = new_id("ST_")
        if response.status != 202 and not 200 <= response.status < 300:
            return sip.TransferSIPParticipantResponse(
                transfer_id=transfer_id,
                status=sip.STS_TRANSFER_FAILED,
                reason=sip.STR_REJECTED,
                sip_status=sip.SIPStatus(code=response.status, status=response.reason),  # type: ignore[arg-type]
            )
        await call.bye("transferred")
        return sip.TransferSIPParticipantResponse(
            transfer_id=transfer_id, status=sip.STS_TRANSFER_SUCCESSFUL
        )

    def _find_participant(self, room_name: str, identity: str) -> InboundSipCall | None:
        for call in self.calls.values():
            if not isinstance(call, InboundSipCall) or call.answer is None:
                continue
            if (call.room_name, call.identity) == (room_name, identity):
                return call
        return None

    # -- retransmissions and bookkeeping -----------------------------------------------------

    def _retransmit_until_ack(self, request: SipMessage, peer: Peer, data: bytes) -> None:
        if peer.transport != "UDP":
            return
        key = (request.vias[0].branch, "INVITE")
        call = self._by_branch.get(key[0])
        acked = call.acked if call is not None and data.startswith(b"SIP/2.0 2") else None
        if acked is None:
            acked = asyncio.Event()
            self._acked[key] = acked
        self._spawn(self._retransmit(peer, data, acked, key))

    async def _retransmit(
        self, peer: Peer, data: bytes, acked: asyncio.Event, key: tuple[str, str]
    ) -> None:
        interval, waited = T1_S, 0.0
        try:
            while waited < TRANSACTION_LIFETIME_S:
                try:
                    await asyncio.wait_for(acked.wait(), interval)
                    return
                except TimeoutError:
                    waited += interval
                    peer.send(data)
                    interval = min(interval * 2, T2_S)
        finally:
            self._acked.pop(key, None)

    def _expire_transactions(self) -> None:
        now = time.monotonic()
        while self._transactions:
            key, oldest = next(iter(self._transactions.items()))
            if oldest.expires > now:
                break
            del self._transactions[key]

    # -- what cannot be parsed ---------------------------------------------------------------

    def _refused(self, data: bytes, error: Exception, peer: Peer) -> None:
        """Answer a malformed request 400 (505 for another SIP version) when it carries enough
        to address a response; drop anything else. Logged at most every 10 s."""
        self.refused_messages += 1
        now = time.monotonic()
        if now - self._garbage_logged_at > GARBAGE_LOG_INTERVAL_S:
            self._garbage_logged_at = now
            log.warning(
                "sip message refused",
                extra={
                    "peer": peer.host,
                    "reason": str(error)[:200],
                    "refused": self.refused_messages,
                },
            )
        request = _lenient_request(data)
        if request is None:
            return
        status = 505 if isinstance(error, UnsupportedVersion) else 400
        response = reply(request, status, REASONS[status] if status == 505 else _short(error))
        peer.send(response.encode())


def _short(error: Exception) -> str:
    text = str(error).replace("\r", " ").replace("\n", " ")
    return ("Bad Request: " + text)[:120]


def _lenient_request(data: bytes) -> SipMessage | None:
    """The addressing headers of something that looks like a request, or None."""
    text = data[:8192].decode("utf-8", errors="replace")
    lines = text.replace("\r\n", "\n").split("\n")
    first = lines[0].split()
    if len(first) < 3 or not first[-1].upper().startswith("SIP/") or first[0] == "ACK":
        return None
    msg = SipMessage(method=first[0], uri=first[1])
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if sep and canonical(name.strip()) in ("Via", "From", "To", "Call-ID", "CSeq"):
            msg.add(name.strip(), value.strip())
    if not all(msg.get(h) for h in ("Via", "From", "To", "Call-ID", "CSeq")):
        return None
    return msg


__all__ = ["SipGateway", "SipParseError"]
