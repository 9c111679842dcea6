"""The fast token paths in `callboard.server.auth` are exact shortcuts, not new rules.

`mint_agent_token` signs directly instead of going through livekit-api's AccessToken: the token
must be byte for byte the same. `KeyStore.verify` checks the usual token without pyjwt's per-call
key preparation: whatever it accepts, pyjwt must accept with the same claims, and everything else
must still be decided (and worded) by pyjwt.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import itertools
import json
import time
from typing import Any, Final

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit import api

from callboard.server.auth import (
    AgentTokenRequest,
    AuthError,
    Grants,
    KeyStore,
    grants_from_claims,
    mint_agent_token,
)

KEY: Final = "pathkey"
SECRET: Final = "path-test-secret-5d1e9b3c7a2f4e60"
OTHER_SECRET: Final = "another-secret-of-enough-length-0123"
LEEWAY_S: Final = 60


def reference_token(api_key: str, secret: str, req: AgentTokenRequest, ttl_s: float) -> str:
    """What livekit-api's AccessToken makes of an agent token request."""
    grants = api.VideoGrants(
        room_join=True,
        room=req.room,
        agent=True,
        can_publish=req.can_publish,
        can_subscribe=req.can_subscribe,
        can_publish_data=req.can_publish_data,
        can_update_own_metadata=req.can_update_metadata,
        hidden=req.hidden,
        can_publish_sources=req.can_publish_sources or None,
    )
    return (
        api.AccessToken(api_key, secret)
        .with_identity(req.identity)
        .with_name(req.name)
        .with_kind("agent")
        .with_metadata(req.metadata)
        .with_attributes(dict(req.attributes))
        .with_grants(grants)
        .with_ttl(datetime.timedelta(seconds=ttl_s))
        .to_jwt()
    )


def agent_requests() -> list[AgentTokenRequest]:
    out = []
    for name, metadata, attributes, sources, flags in itertools.product(
        ["", "Agent ñ"],
        ["", '{"caller": "+56 9 7523 1235", "é": "\\u2028"}'],
        [{"lk.agent_name": ""}, {"lk.agent_name": "bench", "empty": "", "ü": "x"}],
        [[], ["microphone", "screen_share"]],
        [(True, True, True, True, False), (False, False, False, False, True)],
    ):
        out.append(
            AgentTokenRequest(
                room="call-_+56975231235_abc/é",
                identity="agent-AJ_abc",
                name=name,
                metadata=metadata,
                attributes=attributes,
                can_publish=flags[0],
                can_subscribe=flags[1],
                can_publish_data=flags[2],
                can_update_metadata=flags[3],
                hidden=flags[4],
                can_publish_sources=sources,
            )
        )
    return out


@pytest.mark.parametrize("secret", ["secret", SECRET])
@pytest.mark.parametrize("ttl_s", [3600.0, 10, 0.5])
def test_minted_agent_token_is_byte_identical_to_access_token(secret: str, ttl_s: float) -> None:
    for req in agent_requests():
        for _ in range(5):  # both sides read the clock: retry if a second boundary fell between
            second = int(time.time())
            ours = mint_agent_token(KEY, secret, req, ttl_s)
            theirs = reference_token(KEY, secret, req, ttl_s)
            if int(time.time()) == second:
                break
        assert ours == theirs


def test_minting_refuses_what_access_token_refuses() -> None:
    req = agent_requests()[0]
    for bad in ({"identity": ""}, {"room": ""}):
        broken = AgentTokenRequest(**{**req.__dict__, **bad})
        with pytest.raises(ValueError, match="identity and room must be set"):
            mint_agent_token(KEY, SECRET, broken, 60)


# -- verification ------------------------------------------------------------------------------


def pyjwt_verify(keys: KeyStore, token: str) -> Grants:
    """`KeyStore.verify` as it was before the fast path: pyjwt for everything."""
    return grants_from_claims(*keys._verify_pyjwt(token))


def outcome(fn: Any, keys: KeyStore, token: str) -> tuple[str, object]:
    try:
        return "ok", fn(keys, token)
    except AuthError as e:
        return "refused", str(e)


def assert_same_as_pyjwt(keys: KeyStore, token: str) -> None:
    fast = keys._verify_common(token)
    if fast is not None:
        assert fast == keys._verify_pyjwt(token)
    assert outcome(KeyStore.verify, keys, token) == outcome(pyjwt_verify, keys, token)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], claims: object, secret: str = SECRET) -> str:
    """A token built segment by segment, for what pyjwt's encoder would not write."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def base_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "video": {"roomAdmin": True, "room": "r"},
        "sub": "svc",
        "iss": KEY,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def keys() -> KeyStore:
    return KeyStore({KEY: SECRET, "short": "secret"}, LEEWAY_S)


def token_cases() -> dict[str, str]:
    now = int(time.time())
    good = jwt.encode(base_claims(), SECRET, algorithm="HS256")
    h, p, s = good.split(".")
    return {
        "livekit-api token": api.AccessToken(KEY, SECRET)
        .with_grants(api.VideoGrants(room_admin=True, room="r"))
        .to_jwt(),
        "plain": good,
        "short dev-style secret": jwt.encode(base_claims(iss="short"), "secret"),
        "header keys reordered": hand_signed({"typ": "JWT", "alg": "HS256"}, base_claims()),
        "header without typ": hand_signed({"alg": "HS256"}, base_claims()),
        "header with kid": hand_signed({"alg": "HS256", "typ": "JWT", "kid": "k"}, base_claims()),
        "header with bad kid": hand_signed({"alg": "HS256", "kid": 5}, base_claims()),
        "header with crit": hand_signed({"alg": "HS256", "crit": ["b64"]}, base_claims()),
        "header HS384": jwt.encode(base_claims(), SECRET, algorithm="HS384"),
        "alg none": jwt.encode(base_claims(), None, algorithm="none"),
        "wrong secret": jwt.encode(base_claims(), OTHER_SECRET),
        "unknown key": jwt.encode(base_claims(iss="nokey"), SECRET),
        "no iss": jwt.encode(base_claims(iss=None), SECRET),
        "iss not a string": hand_signed({"alg": "HS256"}, base_claims(iss=5)),
        "expired": jwt.encode(base_claims(exp=now - 2 * LEEWAY_S), SECRET),
        "expired within leeway": jwt.encode(base_claims(exp=now - LEEWAY_S // 2), SECRET),
        "nbf in the future": jwt.encode(base_claims(nbf=now + 2 * LEEWAY_S), SECRET),
        "nbf within leeway": jwt.encode(base_claims(nbf=now + LEEWAY_S // 2), SECRET),
        "no exp": jwt.encode(base_claims(exp=None), SECRET),
        "no nbf": jwt.encode(base_claims(nbf=None), SECRET),
        "float exp": jwt.encode(base_claims(exp=now + 600.5), SECRET),
        "string exp": jwt.encode(base_claims(exp=str(now + 600)), SECRET),
        "bool nbf": jwt.encode(base_claims(nbf=True), SECRET),
        "iat": jwt.encode(base_claims(iat=now), SECRET),
        "iat in the future": jwt.encode(base_claims(iat=now + 3 * LEEWAY_S), SECRET),
        "aud": jwt.encode(base_claims(aud="x"), SECRET),
        "jti": jwt.encode(base_claims(jti=5), SECRET),
        "sub not a string": hand_signed({"alg": "HS256"}, base_claims(sub=5)),
        "video not an object": jwt.encode(base_claims(video=[1]), SECRET),
        "no video": jwt.encode(base_claims(video=None), SECRET),
        "payload a list": hand_signed({"alg": "HS256"}, [1, 2]),
        "padded signature": f"{h}.{p}.{s}=",
        "padded payload": f"{h}.{p}=.{s}",
        "tampered payload": f"{h}.{b64(json.dumps(base_claims(sub='root')).encode())}.{s}",
        "flipped signature": f"{h}.{p}.{s[:-2]}{'A' if s[-2] != 'A' else 'B'}{s[-1]}",
        "non-canonical signature": f"{h}.{p}.{s[:-1]}{chr(ord(s[-1]) ^ 1)}",
        "four segments": f"{h}.{p}.{s}.{s}",
        "two segments": f"{h}.{p}",
        "not a jwt": "not-a-jwt",
        "non-ascii": f"{h}.{p}.{s}é",
        "empty": "",
    }


@pytest.mark.parametrize("case", list(token_cases()))
def test_fast_verification_decides_like_pyjwt(keys: KeyStore, case: str) -> None:
    assert_same_as_pyjwt(keys, token_cases()[case])


def test_fast_path_takes_the_usual_tokens(keys: KeyStore) -> None:
    cases = token_cases()
    for case in ("livekit-api token", "plain", "header keys reordered", "no nbf"):
        assert keys._verify_common(cases[case]) is not None, case
    for case in ("iat", "aud", "header with kid", "float exp", "wrong secret", "expired"):
        assert keys._verify_common(cases[case]) is None, case


claim_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    iss=st.sampled_from([KEY, "short", "nokey", 5, None]),
    exp_offset=st.sampled_from([None, -3600, -2 * LEEWAY_S, -LEEWAY_S // 2, 0, 600]),
    nbf_offset=st.sampled_from([None, -600, 0, LEEWAY_S // 2, 2 * LEEWAY_S]),
    extra=st.dictionaries(
        st.sampled_from(["iat", "aud", "jti", "sub", "video", "name", "kind"]), claim_values
    ),
    exp_as=st.sampled_from([int, float, str]),
    secret=st.sampled_from([SECRET, "secret", OTHER_SECRET]),
    header=st.sampled_from(
        [{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"}, {"alg": "HS256", "typ": "x"}]
    ),
    mutate=st.integers(min_value=-1, max_value=400),
)
def test_fast_verification_matches_pyjwt_on_generated_tokens(
    iss: object,
    exp_offset: int | None,
    nbf_offset: int | None,
    extra: dict[str, object],
    exp_as: type,
    secret: str,
    header: dict[str, Any],
    mutate: int,
) -> None:
    keys = KeyStore({KEY: SECRET, "short": "secret"}, LEEWAY_S)
    now = int(time.time())
    claims: dict[str, Any] = {"iss": iss, **extra}
    if exp_offset is not None:
        claims["exp"] = exp_as(now + exp_offset)
    if nbf_offset is not None:
        claims["nbf"] = now + nbf_offset
    token = hand_signed(header, {k: v for k, v in claims.items() if v is not None}, secret)
    if 0 <= mutate < len(token):  # one character changed somewhere
        token = token[:mutate] + ("A" if token[mutate] != "A" else "B") + token[mutate + 1 :]
    assert_same_as_pyjwt(keys, token)
