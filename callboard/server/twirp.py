"""Generic Twirp endpoint: `POST /twirp/<package>.<Service>/<Method>`, JSON and protobuf bodies.

Handlers are plain async functions `(grants, request) -> response`; this module owns decoding,
encoding, content negotiation and Twirp's error format (`{"code", "msg", "meta"}` with the
standard code → HTTP status mapping). It knows nothing of rooms or agents.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from callboard.log import get_logger
from callboard.server.auth import AuthError, Grants, KeyStore
from callboard.server.config import MAX_TWIRP_BODY_BYTES

log = get_logger("server.twirp")

TWIRP_PREFIX: Final = "/twirp"
JSON: Final = "application/json"
PROTOBUF: Final = "application/protobuf"
JSON_WHITESPACE: Final = " \t\n\r"

# Twirp error codes and their HTTP statuses (twirp spec v7).
HTTP_STATUS: Final[Mapping[str, int]] = {
    "canceled": 408,
    "invalid_argument": 400,
    "malformed": 400,
    "deadline_exceeded": 408,
    "not_found": 404,
    "bad_route": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "unauthenticated": 401,
    "resource_exhausted": 429,
    "failed_precondition": 412,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "dataloss": 500,
    "unknown": 500,
}


class TwirpError(Exception):
    """An error a handler returns to the client as a Twirp error body."""

    def __init__(self, code: str, msg: str, meta: Mapping[str, str] | None = None) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown twirp code {code!r}")
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.meta = dict(meta or {})

    def response(self) -> web.Response:
        body: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.meta:
            body["meta"] = self.meta
        return web.Response(status=HTTP_STATUS[self.code], text=json.dumps(body), content_type=JSON)


Handler = Callable[[Grants | None, Any], Awaitable[Message]]


@dataclass(frozen=True)
class Method:
    request_type: type[Message]
    handler: Handler


class TwirpRouter:
    """Maps `<package>.<Service>/<Method>` to typed handlers and serves them on aiohttp."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys
        self._methods: dict[str, Method] = {}

    def add(self, service: str, method: str, request_type: type[Message], handler: Handler) -> None:
        self._methods[f"{service}/{method}"] = Method(request_type, handler)

    def install(self, app: web.Application) -> None:
        app.router.add_route("*", TWIRP_PREFIX + "/{route:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        try:
            return await self._serve(request, route)
        except TwirpError as e:
            log.info(
                "twirp request refused",
                extra={"route": route, "code": e.code, "reason": e.msg},
            )
            return e.response()
        except Exception:
            log.exception("twirp handler failed", extra={"route": route})
            return TwirpError("internal", "internal server error").response()

    async def _serve(self, request: web.Request, route: str) -> web.Response:
        # Like Go's twirp, a bad_route error names the refused route in its meta.
        bad_route = {"twirp_invalid_route": f"{request.method} {request.path}"}
        if request.method != "POST":
            raise TwirpError(
                "bad_route", f"unsupported method {request.method} (only POST)", bad_route
            )
        method = self._methods.get(route)
        if method is None:
            raise TwirpError("bad_route", f"no handler for path /twirp/{route}", bad_route)
        content_type = request.content_type
        if content_type not in (JSON, PROTOBUF):
            raise TwirpError(
                "bad_route",
                f"unexpected Content-Type {content_type!r}: use {JSON} or {PROTOBUF}",
                bad_route,
            )
        grants = self._grants(request)
        if request.content_length is not None and request.content_length > MAX_TWIRP_BODY_BYTES:
            raise TwirpError("malformed", f"body larger than {MAX_TWIRP_BODY_BYTES} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # A chunked body has no Content-Length to check up front; aiohttp stops it here.
            raise TwirpError(
                "malformed", f"body larger than {MAX_TWIRP_BODY_BYTES} bytes"
            ) from None
        except ConnectionError:
            # The client hung up before its whole body arrived: nobody is left to answer.
            raise TwirpError(
                "canceled", "the client closed the connection before sending the whole body"
            ) from None
        if len(body) > MAX_TWIRP_BODY_BYTES:
            raise TwirpError("malformed", f"body larger than {MAX_TWIRP_BODY_BYTES} bytes")
        req = _decode(method.request_type, body, content_type)
        resp = await method.handler(grants, req)
        if content_type == JSON:
            return web.Response(text=encode_json(resp), content_type=JSON)
        return web.Response(body=resp.SerializeToString(), content_type=PROTOBUF)

    def _grants(self, request: web.Request) -> Grants | None:
        try:
            return self._keys.verify_header(request.headers.get("Authorization"), None)
        except AuthError as e:
            raise TwirpError("unauthenticated", str(e)) from None


def encode_json(msg: Message) -> str:
    """Twirp's JSON: original proto field names, defaults included (as Go's twirp emits)."""
    return json.dumps(
        json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def _decode(request_type: type[Message], body: bytes, content_type: str) -> Message:
    req = request_type()
    try:
        if content_type == JSON:
            text = body.decode("utf-8") or "{}"
            # json_format.Parse takes a top-level list or string as an empty message.
            if not text.lstrip(JSON_WHITESPACE).startswith("{"):
                raise json_format.ParseError("the body must be a JSON object")
            json_format.Parse(text, req, ignore_unknown_fields=True)
        else:
            req.ParseFromString(body)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TwirpError(
            "malformed", f"the request body could not be decoded: {_short(str(e))}"
        ) from None
    return req


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def require(grants: Grants | None, *needed: str, room: str | None = None) -> Grants:
    """Check a token's grants like livekit-server: a missing grant is `unauthenticated`."""
    if grants is None:
        raise TwirpError("unauthenticated", "permissions denied: no access token was presented")
    for grant in needed:
        if not grants.has(grant):
            raise TwirpError(
                "unauthenticated", f"permissions denied: token lacks the {grant} grant"
            )
    if room is not None and grants.room != room:
        raise TwirpError(
            "unauthenticated",
            f"permissions denied: token is for room {grants.room!r}, not {room!r}",
        )
    return grants
