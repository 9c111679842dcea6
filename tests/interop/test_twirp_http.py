"""Twirp over plain HTTP against both servers: the seed's curl (JSON), protobuf bodies with
aiohttp, JSON field naming, and the error answers (codes, statuses, bodies)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import pytest
from livekit import api
from livekit.protocol import models, room

from tests.interop.conftest import CALLBOARD, LIVEKIT_SERVER
from tests.interop.livekit_server import API_KEY, ServerProcess
from tests.interop.support import token, unique
from tests.twirp_http import JSON, PROTOBUF, TwirpClient

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60, func_only=True)]

ROOM_SERVICE: Final = "/twirp/livekit.RoomService/"
DISPATCH_SERVICE: Final = "/twirp/livekit.AgentDispatchService/"
CURL_TIMEOUT_S: Final = 20.0


Http = TwirpClient[ServerProcess]


@pytest.fixture
async def http(lk_server: ServerProcess) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(lk_server, session)


# -- the seed's curl, JSON and protobuf bodies ----------------------------------------------------


async def test_seed_curl_creates_a_room(lk_server: ServerProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("the curl binary is not on PATH")
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-X",
        "POST",
        f"{lk_server.http_url}{ROOM_SERVICE}CreateRoom",
        "-H",
        f"Authorization: Bearer {token(room_create=True)}",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"name": "my-room"}',
        "-w",
        "\n%{http_code} %{content_type}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CURL_TIMEOUT_S)
    assert proc.returncode == 0, err
    body, _, trailer = out.decode().rpartition("\n")
    status, content_type = trailer.split(" ", 1)
    assert status == "200", body
    assert content_type.startswith(JSON)
    created = json.loads(body)
    assert created["name"] == "my-room"
    assert created["sid"].startswith("RM_")
    assert created["empty_timeout"] == 300 and created["departure_timeout"] == 20


async def test_protobuf_create_and_list_rooms(http: Http) -> None:
    name = unique("pb")
    req = room.CreateRoomRequest(name=name, metadata="pb-md", empty_timeout=11)
    reply = await http.call(
        ROOM_SERVICE + "CreateRoom",
        req.SerializeToString(),
        token=token(room_create=True),
        content_type=PROTOBUF,
    )
    assert (reply.status, reply.content_type) == (200, PROTOBUF), reply.body
    created = models.Room.FromString(reply.body)
    assert created.sid.startswith("RM_")
    assert (created.name, created.metadata, created.empty_timeout) == (name, "pb-md", 11)
    assert created.departure_timeout == 20

    reply = await http.call(
        ROOM_SERVICE + "ListRooms",
        room.ListRoomsRequest(names=[name]).SerializeToString(),
        token=token(room_list=True),
        content_type=PROTOBUF,
    )
    assert (reply.status, reply.content_type) == (200, PROTOBUF), reply.body
    (listed,) = room.ListRoomsResponse.FromString(reply.body).rooms
    assert listed.sid == created.sid


async def test_json_names_in_and_out(http: Http) -> None:
    """Requests take lowerCamel or proto field names; responses use proto names, int64 as
    strings, and unknown request fields are ignored."""
    body = json.dumps(
        {"name": unique("json"), "emptyTimeout": 7, "departure_timeout": 3, "no_such_field": 1}
    )
    reply = await http.call(ROOM_SERVICE + "CreateRoom", body, token=token(room_create=True))
    assert (reply.status, reply.content_type) == (200, JSON), reply.body
    created = reply.json()
    assert (created["empty_timeout"], created["departure_timeout"]) == (7, 3)
    assert isinstance(created["creation_time"], str) and created["creation_time"].isdigit()
    assert isinstance(created["creation_time_ms"], str)
    assert created["max_participants"] == 0  # zero values are written out
    assert "emptyTimeout" not in created


# -- errors -----------------------------------------------------------------------------------

MISSING_GRANT: Final = [
    ("CreateRoom", ROOM_SERVICE, {"name": "g"}, {"room_list": True}),
    ("ListRooms", ROOM_SERVICE, {}, {"room_create": True}),
    ("DeleteRoom", ROOM_SERVICE, {"room": "g"}, {"room_list": True}),
    ("ListParticipants", ROOM_SERVICE, {"room": "g"}, {"room_create": True}),
    ("CreateDispatch", DISPATCH_SERVICE, {"room": "g"}, {"room_admin": True, "room": "other"}),
    ("ListDispatch", DISPATCH_SERVICE, {"room": "g"}, {"room_admin": True}),
    ("DeleteDispatch", DISPATCH_SERVICE, {"room": "g"}, {"room": "g"}),
]


@pytest.mark.parametrize(
    ("method", "service", "body", "grants"), MISSING_GRANT, ids=[m[0] for m in MISSING_GRANT]
)
async def test_missing_grant_is_unauthenticated(
    http: Http, method: str, service: str, body: dict[str, Any], grants: dict[str, Any]
) -> None:
    """livekit-server answers `permissions denied`; callboard adds which grant is missing."""
    reply = await http.call(service + method, json.dumps(body), token=token(**grants))
    status, code, msg = reply.twirp_error()
    assert (status, code) == (401, "unauthenticated")
    if http.server.kind == LIVEKIT_SERVER:
        assert msg == "permissions denied"
    else:
        assert msg.startswith("permissions denied: ")


async def test_no_token_is_unauthenticated(http: Http) -> None:
    reply = await http.call(ROOM_SERVICE + "ListRooms")
    status, code, msg = reply.twirp_error()
    assert (status, code) == (401, "unauthenticated")
    assert msg.startswith("permissions denied")


async def test_token_with_a_wrong_secret_is_refused(http: Http) -> None:
    """Pinned difference in the body: both answer 401, livekit-server in text/plain echoing the
    token back, callboard a Twirp `unauthenticated` error that does not repeat the token."""
    forged = (
        api.AccessToken(API_KEY, "not-the-secret")
        .with_grants(api.VideoGrants(room_list=True))
        .to_jwt()
    )
    reply = await http.call(ROOM_SERVICE + "ListRooms", token=forged)
    assert reply.status == 401
    if http.server.kind == LIVEKIT_SERVER:
        assert reply.content_type == "text/plain"
        assert reply.body.startswith(b"invalid token")
    else:
        _, code, _ = reply.twirp_error()
        assert code == "unauthenticated"
        assert forged.encode() not in reply.body


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b'{"name":', JSON), (b"\xff\xff\xff", PROTOBUF)],
    ids=["json", "protobuf"],
)
async def test_undecodable_body_is_malformed(http: Http, body: bytes, content_type: str) -> None:
    reply = await http.call(
        ROOM_SERVICE + "CreateRoom", body, token=token(room_create=True), content_type=content_type
    )
    status, code, _ = reply.twirp_error()
    assert (status, code) == (400, "malformed")


@pytest.mark.parametrize(
    ("path", "method", "content_type"),
    [
        (ROOM_SERVICE + "NoSuchMethod", "POST", JSON),
        (ROOM_SERVICE + "CreateRoom", "GET", JSON),
        (ROOM_SERVICE + "CreateRoom", "POST", "text/plain"),
    ],
    ids=["unknown-method", "get", "content-type"],
)
async def test_bad_route_names_the_route_in_meta(
    http: Http, path: str, method: str, content_type: str
) -> None:
    reply = await http.call(
        path,
        b"{}",
        token=token(room_create=True),
        content_type=content_type,
        method=method,
    )
    status, code, _ = reply.twirp_error()
    assert (status, code) == (404, "bad_route")
    assert reply.json()["meta"] == {"twirp_invalid_route": f"{method} {path}"}


async def test_empty_room_name(http: Http) -> None:
    """Pinned difference: livekit-server creates a room named "" (with a sid); callboard refuses
    the request as invalid_argument."""
    reply = await http.call(
        ROOM_SERVICE + "CreateRoom", b'{"name": ""}', token=token(room_create=True)
    )
    if http.server.kind == CALLBOARD:
        status, code, _ = reply.twirp_error()
        assert (status, code) == (400, "invalid_argument")
    else:
        assert reply.status == 200, reply.body
        created = reply.json()
        assert created["name"] == "" and created["sid"].startswith("RM_")


async def test_dispatch_calls_on_a_missing_room(http: Http) -> None:
    """Pinned difference: the real server routes dispatch calls to the node hosting the room and,
    with no such room, answers 503 `unavailable` after ~3 s ("no response from servers").
    callboard answers at once: ListDispatch an empty list, DeleteDispatch `not_found`."""
    name = unique("missing")
    grants = token(room_admin=True, room=name)
    listed, deleted = await asyncio.gather(
        http.call(DISPATCH_SERVICE + "ListDispatch", json.dumps({"room": name}), token=grants),
        http.call(
            DISPATCH_SERVICE + "DeleteDispatch",
            json.dumps({"room": name, "dispatch_id": "AD_nonexistent1"}),
            token=grants,
        ),
    )
    if http.server.kind == CALLBOARD:
        assert (listed.status, listed.json()) == (200, {"agent_dispatches": []})
        assert deleted.twirp_error()[:2] == (404, "not_found")
    else:
        assert listed.twirp_error()[:2] == (503, "unavailable")
        assert deleted.twirp_error()[:2] == (503, "unavailable")


async def test_delete_unknown_dispatch_of_an_existing_room_is_not_found(http: Http) -> None:
    name = unique("unknown-dispatch")
    created = await http.call(
        ROOM_SERVICE + "CreateRoom", json.dumps({"name": name}), token=token(room_create=True)
    )
    assert created.status == 200
    reply = await http.call(
        DISPATCH_SERVICE + "DeleteDispatch",
        json.dumps({"room": name, "dispatch_id": "AD_nonexistent1"}),
        token=token(room_admin=True, room=name),
    )
    assert reply.twirp_error()[:2] == (404, "not_found")
