"""Access tokens: verify what clients present, mint what agents receive.

Tokens are LiveKit's: HS256 JWTs signed with an API secret, `iss` = API key, grants under
`video` in lowerCamel (roomJoin, roomAdmin, agent, ...). Error messages never echo the token.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from livekit import api

from callboard.log import redact_secret

BEARER_PREFIX: Final = "Bearer "
ALGORITHM: Final = "HS256"


class AuthError(Exception):
    """A token was refused; the message says why without repeating the token."""


@dataclass(frozen=True)
class Grants:
    """The verified claims of a token, with the fields the server checks."""

    api_key: str
    identity: str
    video: Mapping[str, Any]

    def has(self, grant: str) -> bool:
        return bool(self.video.get(grant))

    @property
    def room(self) -> str:
        return str(self.video.get("room", ""))


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
        video = claims.get("video") or {}
        if not isinstance(video, dict):
            raise AuthError("invalid token: 'video' grant must be an object")
        return Grants(api_key=api_key, identity=str(claims.get("sub", "")), video=video)

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
    """A room-join token for an agent participant (kind `agent`), like livekit-server's."""
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
    token = (
        api.AccessToken(api_key, secret)
        .with_identity(req.identity)
        .with_name(req.name)
        .with_kind("agent")
        .with_metadata(req.metadata)
        .with_attributes(dict(req.attributes))
        .with_grants(grants)
        .with_ttl(datetime.timedelta(seconds=ttl_s))
    )
    return token.to_jwt()
