"""Plain-HTTP Twirp calls for the tests that need the raw reply (status, content type, body)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import aiohttp

JSON: Final = "application/json"
PROTOBUF: Final = "application/protobuf"


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def twirp_error(self) -> tuple[int, str, str]:
        """(HTTP status, Twirp code, message) of an error reply."""
        assert self.content_type == JSON, (self.content_type, self.body)
        err = self.json()
        assert set(err) <= {"code", "msg", "meta"}
        return self.status, err["code"], err["msg"]


async def twirp_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes | str = b"{}",
    *,
    token: str | None = None,
    content_type: str = JSON,
    method: str = "POST",
) -> Reply:
    """Send `body` to `url` as a Twirp call (Bearer `token` if given) and keep the raw reply."""
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body.encode() if isinstance(body, str) else body
    async with session.request(method, url, data=data, headers=headers) as resp:
        return Reply(resp.status, resp.content_type, await resp.read())


class HasHttpUrl(Protocol):
    @property
    def http_url(self) -> str: ...


S = TypeVar("S", bound=HasHttpUrl)


@dataclass
class TwirpClient(Generic[S]):
    """Raw Twirp calls to `server` (any server with an `http_url`) over one aiohttp session."""

    server: S
    session: aiohttp.ClientSession

    async def call(
        self,
        path: str,
        body: bytes | str = b"{}",
        *,
        token: str | None = None,
        content_type: str = JSON,
        method: str = "POST",
    ) -> Reply:
        return await twirp_request(
            self.session,
            self.server.http_url + path,
            body,
            token=token,
            content_type=content_type,
            method=method,
        )
