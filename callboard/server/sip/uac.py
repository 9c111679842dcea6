"""The calling side of SIP (RFC 3261 §8.1, §17.1, §13.2): client transactions matched by Via
branch with UDP retransmissions, and one outgoing INVITE dialog — digest answers to 401/407,
ACK, BYE. Used by the gateway to dial out and by `callboard call`."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from callboard.server.sip.config import T1_S, T2_S, TRANSACTION_LIFETIME_S
from callboard.server.sip.digest import Challenge
from callboard.server.sip.message import NameAddr, SipMessage, SipUri

MAX_AUTH_ATTEMPTS: Final = 2
USER_AGENT: Final = "callboard"

Send = Callable[[bytes], None]


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class ClientTransactions:
    """Responses routed to the request that caused them, by the top Via branch."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Queue[SipMessage]] = {}

    def on_response(self, msg: SipMessage) -> bool:
        vias = msg.get_all("Via")
        branch = msg.vias[0].branch if vias else ""
        queue = self._waiting.get(branch)
        if queue is None:
            return False
        queue.put_nowait(msg)
        return True

    async def request(
        self,
        request: SipMessage,
        send: Send,
        *,
        reliable: bool,
        on_provisional: Callable[[SipMessage], None] | None = None,
        timeout: float = TRANSACTION_LIFETIME_S,
    ) -> SipMessage:
        """Send `request`, retransmitting over UDP (Timer A/E), and return its final response;
        a 408 is made up when none comes within `timeout` (Timer B/F)."""
        branch = request.vias[0].branch
        queue: asyncio.Queue[SipMessage] = asyncio.Queue()
        self._waiting[branch] = queue
        data = request.encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval, heard = T1_S, False
        try:
            send(data)
            while True:
                wait = deadline - loop.time()
                if wait <= 0:
                    return SipMessage(status=408, reason="Request Timeout", headers=request.headers)
                if not reliable and not heard:
                    wait = min(wait, interval)
                try:
                    response = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if not reliable and not heard:
                        send(data)
                        interval = min(interval * 2, T2_S)
                    continue
                if response.status >= 200:
                    return response
                heard = heard or request.method == "INVITE"
                if on_provisional is not None:
                    on_provisional(response)
        finally:
            self._waiting.pop(branch, None)


@dataclass
class DialTarget:
    """Who to call and how to reach them."""

    host: str
    port: int
    to_user: str
    from_user: str
    transport: str = "UDP"
    username: str = ""
    password: str = ""
    from_host: str = ""
    display_name: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class OutgoingDialog:
    """One INVITE we send, and the dialog it makes once answered."""

    def __init__(
        self,
        target: DialTarget,
        transactions: ClientTransactions,
        send: Send,
        local: tuple[str, int],
    ) -> None:
        self.target = target
        self._transactions = transactions
        self._send = send
        self.local_host, self.local_port = local
        self.call_id = secrets.token_hex(12)
        self.local_tag = secrets.token_hex(6)
        self.remote_tag = ""
        self.remote_target = SipUri("sip", target.to_user, target.host, target.port, {})
        self.cseq = secrets.randbelow(10_000) + 1
        self.invite_cseq = 0

    @property
    def reliable(self) -> bool:
        return self.target.transport != "UDP"

    def _request(self, method: str, uri: str, cseq: int, branch: str = "") -> SipMessage:
        target = self.target
        host = target.from_host or self.local_host
        msg = SipMessage(method=method, uri=uri)
        transport = self.target.transport
        sent_by = f"{self.local_host}:{self.local_port}"
        msg.add("Via", f"SIP/2.0/{transport} {sent_by};branch={branch or new_branch()};rport")
        display = f'"{target.display_name}" ' if target.display_name else ""
        msg.add("From", f"{display}<sip:{target.from_user}@{host}>;tag={self.local_tag}")
        to = f"<sip:{target.to_user}@{target.host}:{target.port}>"
        msg.add("To", f"{to};tag={self.remote_tag}" if self.remote_tag else to)
        msg.add("Call-ID", self.call_id)
        msg.add("CSeq", f"{cseq} {method}")
        params = ";transport=tcp" if self.reliable else ""
        msg.add("Contact", f"<sip:{target.from_user}@{self.local_host}:{self.local_port}{params}>")
        msg.add("Max-Forwards", "70")
        msg.add("User-Agent", USER_AGENT)
        return msg

    async def invite(
        self, offer: bytes, on_provisional: Callable[[SipMessage], None] | None = None
    ) -> SipMessage:
        """Send the INVITE (answering digest challenges with the target's credentials) and
        return the final response; a 2xx is ACKed and makes the dialog."""
        uri = f"sip:{self.target.to_user}@{self.target.host}:{self.target.port}"
        if self.reliable:
            uri += ";transport=tcp"
        authorization: tuple[str, str] | None = None
        for _ in range(MAX_AUTH_ATTEMPTS + 1):
            self.cseq += 1
            self.invite_cseq = self.cseq
            request = self._request("INVITE", uri, self.cseq)
            for name, value in self.target.headers.items():
                request.add(name, value)
            if authorization is not None:
                request.add(*authorization)
            request.add("Content-Type", "application/sdp")
            request.body = offer
            response = await self._transactions.request(
                request, self._send, reliable=self.reliable, on_provisional=on_provisional
            )
            if response.status in (401, 407) and self.target.username:
                header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
                challenge = Challenge.parse(response.get(header))
                answer = challenge.answer(
                    username=self.target.username,
                    password=self.target.password,
                    method="INVITE",
                    uri=uri,
                )
                name = "Authorization" if response.status == 401 else "Proxy-Authorization"
                authorization = (name, answer)
                self._ack(response, uri, branch=request.vias[0].branch)
                continue
            if 200 <= response.status < 300:
                self.remote_tag = response.to.tag
                contact = response.get("Contact")
                if contact:
                    self.remote_target = NameAddr.parse(contact).uri
                self._ack(response, str(self.remote_target))
            elif response.status >= 300 and response.get("Via"):
                self._ack(response, uri, branch=request.vias[0].branch)
            return response
        return response

    def _ack(self, response: SipMessage, uri: str, branch: str = "") -> None:
        """ACK a final response: in the INVITE's transaction for an error, a new one for 2xx."""
        ack = self._request("ACK", uri, self.invite_cseq, branch)
        if not (200 <= response.status < 300):
            ack.remove("To")
            ack.add("To", response.get("To"))
        self._send(ack.encode())

    async def bye(self, reason: str = "") -> SipMessage:
        self.cseq += 1
        request = self._request("BYE", str(self.remote_target), self.cseq)
        if reason:
            request.add("Reason", reason)
        return await self._transactions.request(request, self._send, reliable=self.reliable)

    async def refer(self, refer_to: str) -> SipMessage:
        """Ask the other side to call `refer_to` (RFC 3515 blind transfer)."""
        self.cseq += 1
        request = self._request("REFER", str(self.remote_target), self.cseq)
        request.add("Refer-To", refer_to)
        request.add("Referred-By", f"<sip:{self.target.from_user}@{self.local_host}>")
        return await self._transactions.request(request, self._send, reliable=self.reliable)
