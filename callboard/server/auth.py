"""Access tokens: verify what clients present, mint what agents receive.

Tokens are LiveKit's: HS256 JWTs signed with an API secret, `iss` = API key, grants under
`video` in lowerCamel (roomJoin, roomAdmin, agent, ...). Error messages never echo the token.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from jwt.algorithms import HMACAlgorithm

from callboard.log import redact_secret

try:
    from jwt.warnings import InsecureKeyLengthWarning
except ImportError:  # pyjwt < 2.10 has no key-length warning
    InsecureKeyLengthWarning = UserWarning  # type: ignore[misc,assignment]

BEARER_PREFIX: Final = "Bearer "
ALGORITHM: Final = "HS256"
# The JOSE header pyjwt (and so livekit-api's AccessToken) writes for HS256, base64url-encoded.
_HS256_HEADER: Final = {"alg": ALGORITHM, "typ": "JWT"}
_HS256_HEADER_SEGMENT: Final = (
    base64.urlsafe_b64encode(
        json.dumps(_HS256_HEADER, separators=(",", ":"), sort_keys=True).encode()
    )
    .rstrip(b"=")
    .decode()
)
# Registered claims that make the fast path hand a token to pyjwt's full validation.
_CLAIMS_FOR_PYJWT: Final = frozenset({"iat", "aud", "jti"})
_HMAC: Final = HMACAlgorithm(HMACAlgorithm.SHA256)


@functools.lru_cache(maxsize=64)
def _hmac_key(secret: str) -> tuple[bytes, str | None]:
    """pyjwt's checks of an HS256 secret, once per secret: the key bytes and any key-length
    warning. Raises pyjwt's InvalidKeyError for a secret that looks like an asymmetric key."""
    key: bytes = _HMAC.prepare_key(secret)
    check = getattr(_HMAC, "check_key_length", None)
    return key, check(key) if check is not None else None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode_canonical(segment: str) -> bytes | None:
    """The bytes of an unpadded base64url segment; None unless it is exactly the canonical
    encoding of those bytes (which is what pyjwt accepts)."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _b64url(raw) == segment else None


class AuthError(Exception):
    """A token was refused; the message says why without repeating the token."""


@dataclass(frozen=True)
class Grants:
    """The verified claims of a token, with the fields the server checks."""

    api_key: str
    identity: str
    video: Mapping[str, Any]
    name: str = ""
    metadata: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    kind: str = ""
    """The participant kind claim (`agent`, `sip`, `ingress`, ...); empty means standard."""
    sip: Mapping[str, Any] = field(default_factory=dict)
    """The `sip` claim: `admin` (manage trunks and rules), `call` (dial out, transfer)."""

    def has(self, grant: str) -> bool:
        return bool(self.video.get(grant))

    @property
    def room(self) -> str:
        return str(self.video.get("room", ""))


def grants_from_claims(api_key: str, claims: Mapping[str, Any]) -> Grants:
    """The grants of verified `claims`; raises AuthError for malformed grant claims."""
    video = claims.get("video") or {}
    if not isinstance(video, dict):
        raise AuthError("invalid token: 'video' grant must be an object")
    attributes = claims.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise AuthError("invalid token: 'attributes' must be an object")
    sip = claims.get("sip") or {}
    if not isinstance(sip, dict):
        raise AuthError("invalid token: 'sip' grant must be an object")
    return Grants(
        api_key=api_key,
        identity=str(claims.get("sub", "")),
        video=video,
        name=str(claims.get("name", "")),
        metadata=str(claims.get("metadata", "")),
        attributes={str(k): str(v) for k, v in attributes.items()},
        kind=str(claims.get("kind", "")),
        sip=sip,
    )


class KeyStore:
    """Known API key/secret pairs; verifies presented tokens and mints agent tokens."""

    def __init__(self, keys: Mapping[str, str], leeway: float) -> None:
        self._keys = dict(keys)
        self._leeway = leeway
        for secret in self._keys.values():
            redact_secret(secret)

    def secret_for(self, api_key: str) -> str | None:
        return self._keys.get(api_key)

    def verify(self, token: str) -> Grants:
        """Check signature, issuer, expiry and not-before; return the grants."""
        fast = self._verify_common(token)
        api_key, claims = fast if fast is not None else self._verify_pyjwt(token)
        return grants_from_claims(api_key, claims)

    def _verify_common(self, token: str) -> tuple[str, dict[str, Any]] | None:
        """The usual token (HS256 header, valid signature, int exp/nbf in range, no iat/aud/jti)
        checked without pyjwt's per-call key preparation; None hands the token to pyjwt.

        It accepts a subset of what `_verify_pyjwt` accepts and returns the same claims for it,
        so every refusal, and its message, still comes from pyjwt.
        """
        if not token.isascii():
            return None
        parts = token.split(".")
        if len(parts) != 3:
            return None
        header_segment, payload_segment, signature_segment = parts
        if header_segment != _HS256_HEADER_SEGMENT:
            header_bytes = _b64url_decode_canonical(header_segment)
            try:
                header = json.loads(header_bytes) if header_bytes is not None else None
            except (ValueError, RecursionError):
                return None
            if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
                return None
            if not header.keys() <= _HS256_HEADER.keys():
                return None
        payload_bytes = _b64url_decode_canonical(payload_segment)
        signature = _b64url_decode_canonical(signature_segment)
        if payload_bytes is None or signature is None:
            return None
        try:
            claims = json.loads(payload_bytes)
        except (ValueError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        api_key = claims.get("iss")
        secret = self._keys.get(api_key) if isinstance(api_key, str) else None
        if secret is None or not isinstance(api_key, str):
            return None
        try:
            key, short_key_warning = _hmac_key(secret)
        except jwt.PyJWTError:
            return None
        if short_key_warning:
            warnings.warn(short_key_warning, InsecureKeyLengthWarning, stacklevel=4)
        expected = hmac.new(
            key, f"{header_segment}.{payload_segment}".encode(), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(expected, signature):
            return None
        if not _CLAIMS_FOR_PYJWT.isdisjoint(claims):
            return None
        exp, nbf, sub = claims.get("exp"), claims.get("nbf", 0), claims.get("sub", "")
        if type(exp) is not int or type(nbf) is not int or not isinstance(sub, str):
            return None
        now = time.time()
        if nbf > now + self._leeway or exp <= now - self._leeway:
            return None
        return api_key, claims

    def _verify_pyjwt(self, token: str) -> tuple[str, dict[str, Any]]:
        """pyjwt's full validation, with the reason of any refusal."""
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid authorization token: {e}") from None
        api_key = unverified.get("iss")
        secret = self._keys.get(api_key) if isinstance(api_key, str) else None
        if secret is None or not isinstance(api_key, str):
            raise AuthError(f"invalid API key: {api_key!r} is not known to this server")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                leeway=self._leeway,
                options={"require": ["exp", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("invalid token: expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("invalid token: not valid yet (nbf in the future)") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid token: signature does not match the API secret") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None
        return api_key, claims

    def verify_header(self, authorization: str | None, query_token: str | None) -> Grants | None:
        """Grants from an `Authorization: Bearer` header or `access_token` query; None if absent."""
        if authorization:
            if not authorization.startswith(BEARER_PREFIX):
                raise AuthError("invalid authorization header: must start with 'Bearer '")
            return self.verify(authorization[len(BEARER_PREFIX) :].strip())
        if query_token:
            return self.verify(query_token)
        return None


@dataclass(frozen=True)
class AgentTokenRequest:
    """What an agent's join token carries, from the worker's answer and registration."""

    room: str
    identity: str
    name: str
    metadata: str
    attributes: Mapping[str, str]
    can_publish: bool
    can_subscribe: bool
    can_publish_data: bool
    can_update_metadata: bool
    hidden: bool
    can_publish_sources: list[str]


def mint_agent_token(api_key: str, secret: str, req: AgentTokenRequest, ttl_s: float) -> str:
    """A room-join token for an agent participant (kind `agent`), like livekit-server's.

    Byte for byte what livekit-api's `AccessToken` makes of the same request (same claims in the
    same order, empty values left out, grants in lowerCamel, pyjwt's HS256 header), signed
    here directly because AccessToken costs ~140 µs a token and this runs for every job.
    """
    if not req.identity or not req.room:
        raise ValueError("identity and room must be set when joining a room")
    key, short_key_warning = _hmac_key(secret)
    if short_key_warning:
        warnings.warn(short_key_warning, InsecureKeyLengthWarning, stacklevel=2)
    video: dict[str, Any] = {
        "roomJoin": True,
        "room": req.room,
        "canPublish": req.can_publish,
        "canSubscribe": req.can_subscribe,
        "canPublishData": req.can_publish_data,
    }
    if req.can_publish_sources:
        video["canPublishSources"] = list(req.can_publish_sources)
    video["canUpdateOwnMetadata"] = req.can_update_metadata
    video["hidden"] = req.hidden
    video["agent"] = True
    claims: dict[str, Any] = {}
    if req.name:
        claims["name"] = req.name
    claims["kind"] = "agent"
    if req.metadata:
        claims["metadata"] = req.metadata
    claims["video"] = video
    claims["attributes"] = dict(req.attributes)
    now = time.time()
    claims["sub"] = req.identity
    claims["iss"] = api_key
    claims["nbf"] = int(now)
    claims["exp"] = int(now + ttl_s)
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{_HS256_HEADER_SEGMENT}.{payload}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"
