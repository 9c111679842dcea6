"""The embedded server's HTTP layer: a request aiohttp cannot parse is the client's mistake,
answered 400 and logged as one WARNING line, never an ERROR with a traceback (found by the
frame fuzzer: over-long headers and broken chunked bodies filled the server's error log)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Final

import pytest

from callboard.log import JsonFormatter
from callboard.server.app import BadRequestFilter, EmbeddedServer
from tests.conftest import API_KEY, API_SECRET
from tests.server.support import grant_token

TOKEN: Final = grant_token(API_KEY, API_SECRET, room_create=True)
ROUTE: Final = "/twirp/livekit.RoomService/CreateRoom"
HEAD: Final = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
UNPARSABLE: Final = {
    "a header line over the limit": HEAD + "Authorization: Bearer " + TOKEN * 40 + "\r\n\r\n",
    "a broken chunk size": HEAD + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "a bad request line": "POST /x HTTP/1.1 extra words\r\n\r\n",
}


async def raw_exchange(server: EmbeddedServer, request: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request.encode())
        await writer.drain()
        async with asyncio.timeout(5.0):
            return await reader.read(65536)
    finally:
        writer.close()


@pytest.mark.parametrize("case", list(UNPARSABLE))
async def test_an_unparsable_request_gets_400_and_one_warning(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await raw_exchange(server, UNPARSABLE[case])
    assert answer.split(b" ", 2)[1] == b"400"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    (refused,) = [r for r in caplog.records if r.getMessage() == "bad HTTP request refused"]
    assert refused.levelname == "WARNING" and refused.exc_info is None
    assert refused.__dict__["peer"] == "127.0.0.1" and refused.__dict__["status"] == 400
    assert refused.__dict__["reason"] and "b'" not in refused.__dict__["reason"]
    line = JsonFormatter().format(refused)
    assert TOKEN.split(".")[1][:20] not in line, "the request's bytes are not logged"
    # and the server goes on serving
    health = await raw_exchange(server, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.split(b" ", 2)[1] == b"200"


def test_a_handler_failure_keeps_its_error_and_traceback() -> None:
    try:
        raise RuntimeError("a bug in a handler")
    except RuntimeError:
        record = logging.LogRecord(
            "callboard.server.http",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            sys.exc_info(),
        )
    assert BadRequestFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
