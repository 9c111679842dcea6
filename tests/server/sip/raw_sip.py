"""Raw SIP over loopback UDP: send exactly the bytes a test wrote, read what comes back."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Final

from callboard.server.sip.message import SipMessage, SipParseError, parse

HOST: Final = "127.0.0.1"
REPLY_TIMEOUT_S: Final = 2.0


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


class RawSipClient:
    """One UDP socket; `request()` sends and returns the responses up to the first final one."""

    def __init__(self, transport: asyncio.DatagramTransport, collector: _Collector) -> None:
        self._transport = transport
        self._collector = collector

    @classmethod
    async def open(cls, port: int) -> RawSipClient:
        loop = asyncio.get_running_loop()
        transport, collector = await loop.create_datagram_endpoint(
            _Collector, local_addr=(HOST, 0), remote_addr=(HOST, port)
        )
        return cls(transport, collector)

    @property
    def local_port(self) -> int:
        return int(self._transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def responses(
        self, timeout: float = REPLY_TIMEOUT_S, call_id: str = ""
    ) -> list[SipMessage]:
        """What arrives until a final response (or `timeout` with nothing more); with
        `call_id`, only responses in that call (late retransmissions of others are skipped)."""
        got: list[SipMessage] = []
        while True:
            try:
                data = await asyncio.wait_for(self._collector.replies.get(), timeout)
            except TimeoutError:
                return got
            try:
                msg = parse(data)
            except SipParseError:
                # an answer that repeats a request's bad header: keep its status line
                status = re.match(rb"SIP/2\.0 (\d{3}) ", data)
                if status is None:
                    continue
                msg = SipMessage(status=int(status[1]))
            if call_id and msg.call_id != call_id:
                continue
            got.append(msg)
            if msg.status >= 200:
                return got

    async def next_request(self, method: str, timeout: float) -> SipMessage | None:
        """The next request `method` the gateway sends us (others skipped), or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(self._collector.replies.get(), left)
            except TimeoutError:
                return None
            try:
                msg = parse(data)
            except SipParseError:
                continue
            if msg.is_request and msg.method == method:
                return msg
        return None

    async def request(self, data: bytes, timeout: float = REPLY_TIMEOUT_S) -> list[SipMessage]:
        self.send(data)
        return await self.responses(timeout, call_id=parse(data).call_id)

    def close(self) -> None:
        self._transport.close()


def request(
    method: str,
    port: int,
    *,
    caller: str = "+56975231235",
    called: str = "+15550100",
    body: bytes = b"",
    extra: str = "",
    local_port: int = 5999,
) -> bytes:
    """A well-formed request from 127.0.0.1 to the gateway, with fresh branch and Call-ID."""
    tag, branch, call_id = (
        secrets.token_hex(4),
        "z9hG4bK" + secrets.token_hex(6),
        secrets.token_hex(8),
    )
    head = (
        f"{method} sip:{called}@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch={branch};rport\r\n"
        f"From: <sip:{caller}@{HOST}>;tag={tag}\r\n"
        f"To: <sip:{called}@{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:{caller}@{HOST}:{local_port}>\r\n"
        "Max-Forwards: 70\r\n"
    )
    if extra:
        head += extra.rstrip("\r\n") + "\r\n"
    if body:
        head += "Content-Type: application/sdp\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


OFFER: Final = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
)
