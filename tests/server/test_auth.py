"""Who may connect: /agent and Twirp refuse bad tokens with a 401 that never echoes a secret.

The server here runs with its own key pair (not the dev pair) so that the secret is a string no
error message could contain by accident, and every log record of every test is checked for it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
import pytest

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.simworker import SimJob, SimWorker, agent_ws_url
from tests.server.support import (
    AgentClient,
    assert_bystander_works,
    grant_token,
    start_bystander,
)

KEY: Final = "authkey"
SECRET: Final = "auth-test-secret-7f3c9e1a2b4d6f80"
OTHER_SECRET: Final = "some-other-secret-0a1b2c3d4e5f6a7b"
LEEWAY_S: Final = 60
UPGRADE_HEADERS: Final = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}


@dataclass
class IssuedTokens:
    """Every token a test created or received, checked against the logs afterwards."""

    tokens: list[str]

    def add(self, token: str) -> str:
        self.tokens.append(token)
        return token


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    async with run_server(ServerConfig(port=0, keys={KEY: SECRET})) as srv:
        yield srv


@pytest.fixture
def issued(caplog: pytest.LogCaptureFixture) -> Iterator[IssuedTokens]:
    """Capture every log record of the test; afterwards none may hold the secret or a token."""
    caplog.set_level(logging.DEBUG)
    tokens = IssuedTokens([])
    yield tokens
    for record in caplog.records:
        text = record.getMessage() + " " + repr(record.__dict__)
        assert SECRET not in text, f"the API secret leaked into a log record: {record.msg!r}"
        for token in tokens.tokens:
            assert token not in text, f"a token leaked into a log record: {record.msg!r}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid /agent token, with `overrides` applied (None removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": KEY,
        "sub": "worker",
        "nbf": now,
        "exp": now + 600,
        "video": {"agent": True},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def alg_none_token() -> str:
    """An unsigned token (`alg: none`) with otherwise valid claims."""
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims())}."


def tampered_token() -> str:
    """A validly signed token whose payload was then edited to grant more."""
    header, _, signature = sign(claims(video={"roomJoin": True})).split(".")
    return f"{header}.{b64url(claims())}.{signature}"


async def get_agent(server: EmbeddedServer, headers: dict[str, str]) -> tuple[int, str]:
    """A WebSocket upgrade request to /agent that must be refused: (status, body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.http_url + "/agent", headers={**UPGRADE_HEADERS, **headers}) as resp,
    ):
        return resp.status, await resp.text()


BAD_TOKENS: Final[dict[str, tuple[Callable[[], str], str]]] = {
    "expired beyond the leeway": (
        lambda: sign(claims(exp=int(time.time()) - 2 * LEEWAY_S)),
        "expired",
    ),
    "signed with a wrong secret": (
        lambda: sign(claims(), OTHER_SECRET),
        "signature does not match",
    ),
    "unknown API key": (lambda: sign(claims(iss="nokey"), OTHER_SECRET), "'nokey' is not known"),
    "without the agent grant": (
        lambda: sign(claims(video={"roomJoin": True, "room": "r"})),
        "no permissions to access the room",
    ),
    "alg none": (alg_none_token, "alg value is not allowed"),
    "tampered payload": (tampered_token, "signature does not match"),
    "nbf in the future": (
        lambda: sign(claims(nbf=int(time.time()) + 5 * LEEWAY_S)),
        "not valid yet",
    ),
    "without exp": (lambda: sign(claims(exp=None)), "exp"),
    "not a JWT": (lambda: "not-a-jwt", "invalid authorization token"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_agent_token_is_refused_with_401(
    server: EmbeddedServer, issued: IssuedTokens, case: str
) -> None:
    make, expected = BAD_TOKENS[case]
    token = issued.add(make())
    for headers, url_query in (({"Authorization": f"Bearer {token}"}, ""), ({}, token)):
        if url_query:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    server.http_url + "/agent",
                    params={"access_token": url_query},
                    headers=UPGRADE_HEADERS,
                ) as resp,
            ):
                status, body = resp.status, await resp.text()
        else:
            status, body = await get_agent(server, headers)
        assert status == 401
        assert expected in body
        assert token not in body and SECRET not in body


async def test_missing_token_is_refused_with_401(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    assert await get_agent(server, {}) == (401, "missing access token")


async def test_authorization_header_without_bearer_prefix_is_refused(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    token = issued.add(sign(claims()))
    status, body = await get_agent(server, {"Authorization": token})
    assert status == 401
    assert "must start with 'Bearer '" in body
    assert token not in body


async def test_expiry_within_the_leeway_is_accepted(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    token = issued.add(sign(claims(exp=int(time.time()) - LEEWAY_S // 2)))
    client = await AgentClient.connect(server, token)
    assert (await client.register()).startswith("AW_")
    await client.aclose()


async def test_token_in_bearer_header_is_accepted(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    client = await AgentClient.connect(server, issued.add(sign(claims())))
    assert (await client.register("via-header")).startswith("AW_")
    await client.ping()
    await client.aclose()


async def test_token_in_access_token_query_is_accepted(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    token = issued.add(sign(claims()))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(agent_ws_url(server.url), params={"access_token": token}) as ws,
    ):
        client = AgentClient(ws, http)
        assert (await client.register("via-query")).startswith("AW_")
        await client.ping()


async def test_assignment_tokens_and_secret_stay_out_of_the_logs(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    """The whole happy path (register, dispatch, assignment) logs no token and no secret."""
    sim = await start_bystander(server, KEY, SECRET)

    def remember(job: SimJob) -> None:
        issued.add(job.token)

    sim.on_assignment = remember
    await assert_bystander_works(server, sim, KEY, SECRET, "r-logs")
    assert len(issued.tokens) == 1
    await sim.aclose()


async def test_worker_with_a_refused_token_does_not_register(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    sim = SimWorker(server.url, KEY, OTHER_SECRET)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await sim.start()
    assert refused.value.status == 401
    assert server.engine.workers == []
    await sim.aclose()


TWIRP_CREATE_ROOM: Final = "/twirp/livekit.RoomService/CreateRoom"


@pytest.mark.parametrize("case", ["expired beyond the leeway", "signed with a wrong secret"])
async def test_bad_twirp_token_is_unauthenticated(
    server: EmbeddedServer, issued: IssuedTokens, case: str
) -> None:
    make, expected = BAD_TOKENS[case]
    token = issued.add(make())
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.http_url + TWIRP_CREATE_ROOM,
            json={"name": "r"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        body = await resp.json()
    assert resp.status == 401
    assert body["code"] == "unauthenticated"
    assert expected in body["msg"]
    assert token not in json.dumps(body)


async def test_twirp_token_from_the_right_key_is_accepted(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    token = issued.add(grant_token(KEY, SECRET, room_create=True))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.http_url + TWIRP_CREATE_ROOM,
            json={"name": "r-ok"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["name"] == "r-ok"
