"""Twirp: bad requests get Twirp error bodies with the right code; JSON uses proto field names."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import pytest
from livekit.protocol import models, room

from callboard.server.app import EmbeddedServer
from callboard.server.config import MAX_TWIRP_BODY_BYTES
from tests.conftest import API_KEY, API_SECRET
from tests.server.support import grant_token, wait_until
from tests.twirp_http import JSON, PROTOBUF, Reply, TwirpClient

ROOM_SERVICE: Final = "/twirp/livekit.RoomService/"
DISPATCH_SERVICE: Final = "/twirp/livekit.AgentDispatchService/"


Twirp = TwirpClient[EmbeddedServer]


@pytest.fixture
async def twirp(server: EmbeddedServer) -> AsyncIterator[Twirp]:
    async with aiohttp.ClientSession() as http:
        yield Twirp(server, http)


def token(**grants: Any) -> str:
    return grant_token(API_KEY, API_SECRET, **grants)


ADMIN: Final = {"room_create": True, "room_list": True, "room_admin": True, "room": "r"}


# -- routing and decoding ------------------------------------------------------------------------


async def test_malformed_json_is_malformed(twirp: Twirp) -> None:
    reply = await twirp.call(ROOM_SERVICE + "CreateRoom", '{"name": ', token=token(**ADMIN))
    status, code, msg = reply.twirp_error()
    assert (status, code) == (400, "malformed")
    assert "could not be decoded" in msg


@pytest.mark.parametrize(
    ("method", "body"),
    [
        *[(m, b) for m in ("CreateRoom", "ListRooms") for b in ('["a list"]', ' "text"', "null")],
        ("CreateRoom", "5"),
        ("CreateRoom", '{"name": 5}'),
        ("CreateRoom", '{"emptyTimeout": "soon"}'),
    ],
)
async def test_json_that_is_not_the_request_message_is_malformed(
    twirp: Twirp, method: str, body: str
) -> None:
    """Regression: protobuf's json_format took a top-level list or string as an empty message,
    so `["a list"]` reached the handler (ListRooms answered 200 with every room)."""
    reply = await twirp.call(ROOM_SERVICE + method, body, token=token(**ADMIN))
    assert reply.twirp_error()[:2] == (400, "malformed")


async def test_malformed_protobuf_is_malformed(twirp: Twirp) -> None:
    reply = await twirp.call(
        ROOM_SERVICE + "CreateRoom",
        b"\xff\xff\xff\xff not protobuf",
        token=token(**ADMIN),
        content_type=PROTOBUF,
    )
    assert reply.twirp_error()[:2] == (400, "malformed")


async def test_unknown_method_is_bad_route(twirp: Twirp) -> None:
    reply = await twirp.call(ROOM_SERVICE + "ExplodeRoom", token=token(**ADMIN))
    status, code, msg = reply.twirp_error()
    assert (status, code) == (404, "bad_route")
    assert "livekit.RoomService/ExplodeRoom" in msg


async def test_get_is_bad_route(twirp: Twirp) -> None:
    reply = await twirp.call(ROOM_SERVICE + "ListRooms", b"", token=token(**ADMIN), method="GET")
    status, code, msg = reply.twirp_error()
    assert (status, code) == (404, "bad_route")
    assert "GET" in msg


async def test_unsupported_content_type_is_bad_route(twirp: Twirp) -> None:
    reply = await twirp.call(
        ROOM_SERVICE + "ListRooms", "names=a", token=token(**ADMIN), content_type="text/plain"
    )
    status, code, msg = reply.twirp_error()
    assert (status, code) == (404, "bad_route")
    assert "text/plain" in msg


async def test_body_of_exactly_the_limit_is_served(twirp: Twirp) -> None:
    body = b'{"name": "r-big"}'.ljust(MAX_TWIRP_BODY_BYTES, b" ")
    reply = await twirp.call(ROOM_SERVICE + "CreateRoom", body, token=token(**ADMIN))
    assert reply.status == 200
    assert reply.json()["name"] == "r-big"


async def test_body_over_the_limit_is_malformed(twirp: Twirp) -> None:
    body = b" " * (MAX_TWIRP_BODY_BYTES + 1)
    reply = await twirp.call(ROOM_SERVICE + "CreateRoom", body, token=token(**ADMIN))
    status, code, msg = reply.twirp_error()
    assert (status, code) == (400, "malformed")
    assert f"larger than {MAX_TWIRP_BODY_BYTES} bytes" in msg


async def test_chunked_body_over_the_limit_is_malformed_not_internal(twirp: Twirp) -> None:
    """Regression: with no Content-Length, aiohttp's own size limit raised 413 inside the
    handler and the client got a 500 `internal` instead of a Twirp `malformed`."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_TWIRP_BODY_BYTES // (64 * 1024) + 1):
            yield b" " * (64 * 1024)

    async with twirp.session.post(
        twirp.server.http_url + ROOM_SERVICE + "CreateRoom",
        data=chunks(),
        headers={"Content-Type": JSON, "Authorization": f"Bearer {token(**ADMIN)}"},
    ) as resp:
        reply = Reply(resp.status, resp.content_type, await resp.read())
    status, code, msg = reply.twirp_error()
    assert (status, code) == (400, "malformed")
    assert f"larger than {MAX_TWIRP_BODY_BYTES} bytes" in msg


# -- authentication and grants -------------------------------------------------------------------


async def test_no_token_is_unauthenticated(twirp: Twirp) -> None:
    reply = await twirp.call(ROOM_SERVICE + "ListRooms")
    status, code, msg = reply.twirp_error()
    assert (status, code) == (401, "unauthenticated")
    assert "no access token" in msg


async def test_create_room_without_room_create_is_permissions_denied(twirp: Twirp) -> None:
    """livekit-server answers a missing grant with `unauthenticated`, not `permission_denied`."""
    reply = await twirp.call(
        ROOM_SERVICE + "CreateRoom", '{"name": "r"}', token=token(room_list=True)
    )
    status, code, msg = reply.twirp_error()
    assert (status, code) == (401, "unauthenticated")
    assert msg.startswith("permissions denied") and "roomCreate" in msg


async def test_list_dispatch_with_admin_of_another_room_is_permissions_denied(
    twirp: Twirp,
) -> None:
    reply = await twirp.call(
        DISPATCH_SERVICE + "ListDispatch",
        '{"room": "theirs"}',
        token=token(room_admin=True, room="mine"),
    )
    status, code, msg = reply.twirp_error()
    assert (status, code) == (401, "unauthenticated")
    assert msg.startswith("permissions denied") and "'theirs'" in msg


async def test_delete_missing_room_is_not_found(twirp: Twirp) -> None:
    reply = await twirp.call(
        ROOM_SERVICE + "DeleteRoom", '{"room": "ghost"}', token=token(room_create=True)
    )
    status, code, msg = reply.twirp_error()
    assert (status, code) == (404, "not_found")
    assert "'ghost'" in msg


# -- JSON field names and protobuf -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"name": "r-camel", "emptyTimeout": 42, "maxParticipants": 3},
        {"name": "r-proto", "empty_timeout": 42, "max_participants": 3},
    ],
)
async def test_json_request_accepts_lower_camel_and_proto_names(
    twirp: Twirp, body: dict[str, Any]
) -> None:
    reply = await twirp.call(ROOM_SERVICE + "CreateRoom", json.dumps(body), token=token(**ADMIN))
    assert reply.status == 200
    created = reply.json()
    assert (created["name"], created["empty_timeout"], created["max_participants"]) == (
        body["name"],
        42,
        3,
    )


async def test_json_response_uses_proto_field_names(twirp: Twirp) -> None:
    await twirp.call(ROOM_SERVICE + "CreateRoom", '{"name": "r"}', token=token(**ADMIN))
    reply = await twirp.call(ROOM_SERVICE + "ListRooms", "{}", token=token(**ADMIN))
    assert reply.status == 200 and reply.content_type == JSON
    (listed,) = reply.json()["rooms"]
    assert {"sid", "empty_timeout", "departure_timeout", "creation_time", "enabled_codecs"} <= set(
        listed
    )
    assert not {"emptyTimeout", "creationTime", "enabledCodecs"} & set(listed)

    dispatches = await twirp.call(
        DISPATCH_SERVICE + "ListDispatch", '{"room": "r"}', token=token(**ADMIN)
    )
    (dispatch,) = dispatches.json()["agent_dispatches"]
    assert {"agent_name", "state"} <= set(dispatch)
    assert {"dispatch_id", "agent_name", "state"} <= set(dispatch["state"]["jobs"][0])


async def test_protobuf_request_gets_a_protobuf_response(twirp: Twirp) -> None:
    req = room.CreateRoomRequest(name="r-pb", metadata="m")
    reply = await twirp.call(
        ROOM_SERVICE + "CreateRoom",
        req.SerializeToString(),
        token=token(**ADMIN),
        content_type=PROTOBUF,
    )
    assert (reply.status, reply.content_type) == (200, PROTOBUF)
    created = models.Room.FromString(reply.body)
    assert (created.name, created.metadata) == ("r-pb", "m")
    assert created.sid.startswith("RM_")


async def test_a_client_that_hangs_up_mid_body_is_not_an_internal_error(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (found by the frame fuzzer): a body cut short by the client's hang-up was
    logged as "twirp handler failed" at ERROR with a traceback."""
    caplog.set_level(logging.INFO)
    token = grant_token(API_KEY, API_SECRET, room_create=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        (
            f"POST {ROOM_SERVICE}CreateRoom HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: {JSON}\r\n"
            'Content-Length: 100\r\n\r\n{"name": "cut'
        ).encode()
    )
    await writer.drain()
    writer.write_eof()
    async with asyncio.timeout(5.0):
        await reader.read()
    writer.close()

    def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "twirp request refused"]

    await wait_until(lambda: bool(refused()), "the refusal to be logged")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert refused()[0].__dict__["code"] == "canceled"
