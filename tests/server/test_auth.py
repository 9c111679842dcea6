"""Who may connect: /agent and Twirp refuse bad tokens with a 401 that never echoes a secret.

The server here runs with its own key pair (not the dev pair) so that the secret is a string no
error message could contain by accident, and every log record of every test is checked for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
import pytest

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.simworker import SimJob, SimWorker, agent_ws_url
from tests.reliability import record as record_reliability
from tests.server.support import (
    AgentClient,
    assert_bystander_works,
    grant_token,
    start_bystander,
)
from tests.server.token_attacks import (
    ATTACKS,
    ENDPOINTS,
    LEEWAY_S,
    TWIRP_ENDPOINTS,
    UPGRADE_HEADERS,
    Keys,
    attempt,
    refusal_problem,
)
from tests.server.token_attacks import claims as attack_claims

KEY: Final = "authkey"
SECRET: Final = "auth-test-secret-7f3c9e1a2b4d6f80"
OTHER_KEY: Final = "otherkey"
OTHER_KEY_SECRET: Final = "other-key-secret-9c8b7a6f5e4d3c2b1a"
OTHER_SECRET: Final = "some-other-secret-0a1b2c3d4e5f6a7b"
KEYS: Final = Keys(KEY, SECRET, OTHER_KEY, OTHER_KEY_SECRET, OTHER_SECRET)


@dataclass
class IssuedTokens:
    """Every token a test created or received, checked against the logs afterwards."""

    tokens: list[str]

    def add(self, token: str) -> str:
        self.tokens.append(token)
        return token


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    config = ServerConfig(port=0, keys={KEY: SECRET, OTHER_KEY: OTHER_KEY_SECRET})
    async with run_server(config) as srv:
        yield srv


@pytest.fixture
def issued(caplog: pytest.LogCaptureFixture) -> Iterator[IssuedTokens]:
    """Capture every log record of the test; afterwards none may hold the secret or a token."""
    caplog.set_level(logging.DEBUG)
    tokens = IssuedTokens([])
    yield tokens
    for record in caplog.records:
        text = record.getMessage() + " " + repr(record.__dict__)
        for secret in (SECRET, OTHER_KEY_SECRET):
            assert secret not in text, f"an API secret leaked into a log record: {record.msg!r}"
        for token in tokens.tokens:
            assert token not in text, f"a token leaked into a log record: {record.msg!r}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid /agent token, with `overrides` applied (None removes a claim)."""
    return attack_claims(KEYS, **{"video": {"agent": True}, **overrides})


def sign(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


async def get_agent(server: EmbeddedServer, headers: dict[str, str]) -> tuple[int, str]:
    """A WebSocket upgrade request to /agent that must be refused: (status, body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.http_url + "/agent", headers={**UPGRADE_HEADERS, **headers}) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(ATTACKS))
async def test_token_attack_is_refused(
    server: EmbeddedServer, issued: IssuedTokens, case: str, endpoint: str
) -> None:
    """The table of tests/server/token_attacks.py: every bad token, on /agent (header and
    query) and on Twirp (JSON and protobuf), is refused with 401 (Twirp: unauthenticated) and
    a reason that repeats neither the token nor a secret; nothing is created behind it."""
    attack = ATTACKS[case]
    token = issued.add(attack.make(KEYS))
    async with aiohttp.ClientSession() as http:
        answer = await attempt(http, server.http_url, endpoint, token)
    problem = refusal_problem(attack, endpoint, token, [SECRET, OTHER_KEY_SECRET], answer)
    assert problem is None, f"{case} at {endpoint}: {problem}"
    assert server.engine.workers == []
    record_reliability("token_attack", {"case": case, "endpoint": endpoint, "refused": True})


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


async def test_the_attack_claims_unaltered_are_accepted_on_twirp(
    server: EmbeddedServer, issued: IssuedTokens
) -> None:
    """The control for the table: the same request with an honest token gets through."""
    token = issued.add(sign(attack_claims(KEYS)))
    async with aiohttp.ClientSession() as http:
        for endpoint in TWIRP_ENDPOINTS:
            status, code, _ = await attempt(http, server.http_url, endpoint, token)
            assert (status, code) == (200, ""), endpoint
