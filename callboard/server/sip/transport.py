"""SIP over UDP and TCP (RFC 3261 §18): listen on one address, hand each parsed message to the
user agent with where it came from, send replies back the way requests came. Garbage is
answered 400 when it is a request we can address, otherwise dropped; a stream that sends
garbage or too much is closed. Nothing here ever raises into the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from callboard.log import get_logger
from callboard.server.sip.message import (
    MAX_MESSAGE_BYTES,
    SipMessage,
    SipParseError,
    UnsupportedVersion,
    parse,
    split_head,
)

log = get_logger("server.sip.transport")

TCP_IDLE_TIMEOUT_S: Final = 300.0
MAX_TCP_CONNECTIONS: Final = 256
CONNECT_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True)
class Peer:
    """Where a message came from, and how to send something back to it."""

    transport: str
    host: str
    port: int
    send: Callable[[bytes], None]


Handler = Callable[[SipMessage, Peer], None]
Refusal = Callable[[bytes, Exception, Peer], None]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler, refused: Refusal) -> None:
        self._handler = handler
        self._refused = refused
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self.transport
        if transport is None or not data.strip(b"\r\n"):
            return  # keep-alive CRLFs (RFC 5626)

        def send(out: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(out, addr)

        peer = Peer("UDP", addr[0], addr[1], send)
        _deliver(data, peer, self._handler, self._refused, stream=False)

    def error_received(self, exc: Exception) -> None:
        log.debug("sip udp error", extra={"error": str(exc)})


def _deliver(data: bytes, peer: Peer, handler: Handler, refused: Refusal, stream: bool) -> None:
    try:
        msg = parse(data, stream=stream)
    except SipParseError as e:
        refused(data, e, peer)
        return
    try:
        handler(msg, peer)
    except Exception:
        log.exception(
            "sip message handling failed",
            extra={"call_id": msg.call_id, "peer": f"{peer.host}:{peer.port}"},
        )


class SipTransports:
    """UDP and TCP listeners on one host and port (0 picks a free one, the same for both)."""

    def __init__(self, host: str, port: int, handler: Handler, refused: Refusal) -> None:
        self.host = host
        self._port = port
        self._handler = handler
        self._refused = refused
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._streams: set[asyncio.Task[None]] = set()
        self._outgoing: dict[tuple[str, int], Callable[[bytes], None]] = {}

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(self._serve_stream, self.host, self._port)
        self._port = self._tcp.sockets[0].getsockname()[1]
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self._handler, self._refused), local_addr=(self.host, self._port)
        )
        self._udp = udp
        log.info("sip listening", extra={"host": self.host, "port": self._port})

    def send_udp(self, data: bytes, host: str, port: int) -> None:
        """Send from our listening socket (requests we originate, e.g. BYE, over UDP)."""
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(data, (host, port))

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._streams) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._streams.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        try:
            await self._run_stream(reader, writer, Peer("TCP", host, port, _writer_send(writer)))
        finally:
            self._streams.discard(task)

    async def connect(self, host: str, port: int) -> Callable[[bytes], None]:
        """Send over a TCP connection of ours to host:port (calls we place over TCP), opened
        once and kept while it lives; what arrives on it is handled like any message.
        Raises OSError or TimeoutError when it cannot be opened."""
        send = self._outgoing.get((host, port))
        if send is not None:
            return send
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
        )
        send = self._outgoing[(host, port)] = _writer_send(writer)
        task = asyncio.get_running_loop().create_task(
            self._outgoing_stream(reader, writer, Peer("TCP", host, port, send)),
            name="sip-tcp-out",
        )
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        return send

    async def _outgoing_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        try:
            await self._run_stream(reader, writer, peer)
        finally:
            self._outgoing.pop((peer.host, peer.port), None)

    async def _run_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        try:
            await self._read_stream(reader, peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_stream(self, reader: asyncio.StreamReader, peer: Peer) -> None:
        buffer = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(8192), TCP_IDLE_TIMEOUT_S)
            if not chunk:
                return
            buffer += chunk
            while True:
                buffer = buffer.lstrip(b"\r\n")
                framed = _frame(buffer)
                if framed is None:
                    if len(buffer) > MAX_MESSAGE_BYTES:
                        log.warning(
                            "sip stream message too large: closing", extra={"peer": peer.host}
                        )
                        return
                    break
                message, buffer = framed
                _deliver(message, peer, self._handler, self._refused, stream=True)

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.gather(*self._streams, return_exceptions=True)


def _writer_send(writer: asyncio.StreamWriter) -> Callable[[bytes], None]:
    def send(out: bytes) -> None:
        if not writer.is_closing():
            writer.write(out)

    return send


def _frame(buffer: bytes) -> tuple[bytes, bytes] | None:
    """One whole message off the front of a stream buffer, by its Content-Length."""
    parts = split_head(buffer)
    if parts is None:
        return None
    head, rest = parts
    length = 0
    for line in head.split(b"\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in (b"content-length", b"l"):
            text = value.strip()
            length = int(text) if text.isdigit() else 0
    if len(rest) < length:
        return None
    head_len = len(buffer) - len(rest)
    return buffer[: head_len + length], rest[length:]


__all__ = ["Peer", "SipTransports", "UnsupportedVersion"]
