"""What workers dial instead of a node: a TCP front on a loopback port that forwards each new
connection to the first of its nodes that accepts one, in a fixed order (home node first).

It stands for what operators put in front of a LiveKit cluster (a load balancer or a Kubernetes
Service): a worker keeps one `ws_url`, and when its node goes away its reconnection lands on
another node. All fronts of a test share one event loop in a thread of their own, so they keep
forwarding while the test's loop waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Final

from tests.interop.livekit_server import HOST

CHUNK: Final = 65536
CONNECT_TIMEOUT_S: Final = 2.0
STOP_TIMEOUT_S: Final = 5.0


class Fronts:
    """A thread running the fronts' event loop; `open()` adds a front, `close()` ends them."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._streams: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fronts", daemon=True)
        self._thread.start()

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(STOP_TIMEOUT_S)

    def open(self, backends: Sequence[int]) -> int:
        """A new front forwarding to the loopback ports `backends`, tried in order; its port."""
        return int(self._call(self._open(tuple(backends))))

    async def _open(self, backends: tuple[int, ...]) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._forward(reader, writer, backends)

        server = await asyncio.start_server(serve, HOST, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backends: tuple[int, ...]
    ) -> None:
        self._streams.add(writer)
        try:
            for port in backends:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        up_reader, up_writer = await asyncio.open_connection(HOST, port)
                except (OSError, TimeoutError):
                    continue
                self._streams.add(up_writer)
                try:
                    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                finally:
                    self._streams.discard(up_writer)
                    up_writer.close()
                return
        finally:
            self._streams.discard(writer)
            writer.close()

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._streams):
            writer.close()
        for server in self._servers:
            await server.wait_closed()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until either side ends; then end the other direction too."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            dst.close()
