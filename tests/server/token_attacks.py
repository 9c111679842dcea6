"""The token attacks, as one table: each row makes a token and says how /agent and Twirp must
refuse it. `tests/server/test_auth.py` runs the table against the in-process server; the soak
(`tests/soak/`) runs it against the `callboard server` process it restarts.

Twirp attacks target `AgentDispatchService/ListDispatch` for room `TARGET_ROOM`, which needs the
roomAdmin grant for that very room. /agent refuses with HTTP 401 and a reason in the body;
Twirp with HTTP 401 and the Twirp code `unauthenticated`. Neither answer may repeat the token.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
from livekit.protocol import agent_dispatch

LEEWAY_S: Final = 60
"""The server's default token_leeway (ServerConfig.token_leeway)."""
TARGET_ROOM: Final = "target-room"
OTHER_ROOM: Final = "someone-elses-room"
LIST_DISPATCH: Final = "livekit.AgentDispatchService/ListDispatch"
UPGRADE_HEADERS: Final = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}
AGENT_ENDPOINTS: Final = ("agent-header", "agent-query")
TWIRP_ENDPOINTS: Final = ("twirp-json", "twirp-protobuf")
ENDPOINTS: Final = AGENT_ENDPOINTS + TWIRP_ENDPOINTS


@dataclass(frozen=True)
class Keys:
    """The server's key pair, a second pair it also knows, and a secret it does not."""

    key: str
    secret: str
    other_key: str
    other_secret: str
    unknown_secret: str


def claims(keys: Keys, **overrides: Any) -> dict[str, Any]:
    """Claims that would be accepted on both endpoints, with `overrides` (None removes one)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": keys.key,
        "sub": "attacker",
        "nbf": now,
        "exp": now + 600,
        "video": {"agent": True, "roomAdmin": True, "room": TARGET_ROOM},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], secret: str, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def alg_none(keys: Keys) -> str:
    """An unsigned token (`alg: none`) with otherwise valid claims."""
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims(keys))}."


def tampered(keys: Keys) -> str:
    """A validly signed token with no grant, whose payload was then edited to grant all."""
    header, _, signature = sign(claims(keys, video={"roomJoin": True}), keys.secret).split(".")
    return f"{header}.{b64url(claims(keys))}.{signature}"


@dataclass(frozen=True)
class Attack:
    """A bad token and the reason each endpoint gives when it refuses it."""

    make: Callable[[Keys], str]
    agent_reason: str
    twirp_reason: str


def _now() -> int:
    return int(time.time())


ATTACKS: Final[dict[str, Attack]] = {
    "alg none": Attack(alg_none, "alg value is not allowed", "alg value is not allowed"),
    "HS512 instead of HS256": Attack(
        lambda k: sign(claims(k), k.secret, "HS512"),
        "alg value is not allowed",
        "alg value is not allowed",
    ),
    "HS256 with a wrong secret": Attack(
        lambda k: sign(claims(k), k.unknown_secret),
        "signature does not match",
        "signature does not match",
    ),
    "expired beyond the leeway": Attack(
        lambda k: sign(claims(k, exp=_now() - 2 * LEEWAY_S), k.secret), "expired", "expired"
    ),
    "nbf in the future": Attack(
        lambda k: sign(claims(k, nbf=_now() + 5 * LEEWAY_S), k.secret),
        "not valid yet",
        "not valid yet",
    ),
    "without exp": Attack(lambda k: sign(claims(k, exp=None), k.secret), "exp", "exp"),
    "unknown issuer": Attack(
        lambda k: sign(claims(k, iss="no-such-key"), k.secret),
        "'no-such-key' is not known",
        "'no-such-key' is not known",
    ),
    "issuer of another key, signed with this one's secret": Attack(
        lambda k: sign(claims(k, iss=k.other_key), k.secret),
        "signature does not match",
        "signature does not match",
    ),
    "missing the agent and roomAdmin grants": Attack(
        lambda k: sign(claims(k, video={"roomJoin": True, "room": TARGET_ROOM}), k.secret),
        "no permissions to access the room",
        "lacks the roomAdmin grant",
    ),
    "room grant for another room": Attack(
        lambda k: sign(claims(k, video={"roomAdmin": True, "room": OTHER_ROOM}), k.secret),
        "no permissions to access the room",
        f"token is for room {OTHER_ROOM!r}, not {TARGET_ROOM!r}",
    ),
    "tampered payload": Attack(tampered, "signature does not match", "signature does not match"),
    "not a JWT": Attack(
        lambda k: "not-a-jwt", "invalid authorization token", "invalid authorization token"
    ),
}


async def attempt(
    http: aiohttp.ClientSession, http_url: str, endpoint: str, token: str
) -> tuple[int, str, str]:
    """Present `token` at `endpoint`: (HTTP status, Twirp code or "", reason text)."""
    if endpoint in AGENT_ENDPOINTS:
        headers = dict(UPGRADE_HEADERS)
        params = {}
        if endpoint == "agent-header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            params["access_token"] = token
        async with http.get(f"{http_url}/agent", headers=headers, params=params) as resp:
            return resp.status, "", await resp.text()
    if endpoint == "twirp-json":
        data = json.dumps({"room": TARGET_ROOM}).encode()
        content_type = "application/json"
    else:
        data = agent_dispatch.ListAgentDispatchRequest(room=TARGET_ROOM).SerializeToString()
        content_type = "application/protobuf"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    async with http.post(f"{http_url}/twirp/{LIST_DISPATCH}", data=data, headers=headers) as resp:
        text = await resp.text()
    try:
        body = json.loads(text)
    except ValueError:
        return resp.status, "", text
    return resp.status, str(body.get("code", "")), str(body.get("msg", ""))


def refusal_problem(
    attack: Attack, endpoint: str, token: str, secrets: list[str], answer: tuple[int, str, str]
) -> str | None:
    """Why `answer` is not the right refusal of `attack` at `endpoint`; None when it is."""
    status, code, reason = answer
    twirp = endpoint in TWIRP_ENDPOINTS
    expected = attack.twirp_reason if twirp else attack.agent_reason
    if status != 401:
        return f"HTTP {status}, expected 401: {reason[:200]}"
    if twirp and code != "unauthenticated":
        return f"Twirp code {code!r}, expected 'unauthenticated'"
    if expected not in reason:
        return f"reason {reason[:200]!r} does not say {expected!r}"
    if len(token) > 12 and token in reason:
        return "the answer repeats the token"
    if any(s in reason for s in secrets):
        return "the answer repeats an API secret"
    return None


@dataclass
class TableRun:
    """The whole table against one server: how many refusals were right, what was wrong."""

    refused: int
    problems: list[str]
    tokens: list[str]


async def run_table(
    http: aiohttp.ClientSession, http_url: str, keys: Keys, secrets: list[str]
) -> TableRun:
    """Every attack at every endpoint of the server at `http_url`."""
    out = TableRun(0, [], [])
    for case, attack in ATTACKS.items():
        for endpoint in ENDPOINTS:
            token = attack.make(keys)
            out.tokens.append(token)
            answer = await attempt(http, http_url, endpoint, token)
            problem = refusal_problem(attack, endpoint, token, secrets, answer)
            if problem is None:
                out.refused += 1
            else:
                out.problems.append(f"{case} at {endpoint}: {problem}")
    return out
