"""Checks on SIP trunks and dispatch rules before they are stored, with the rules and messages
of the livekit/protocol that livekit-server v1.13.5 builds with (v1.50.5-0.20260728075222:
`livekit/sip.go` Validate*, `types.go` ListUpdate.Validate, `sip_validation.go`).

Every refusal is a `TwirpError` `invalid_argument` whose message is livekit's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from livekit.protocol import models, sip

from callboard.server.twirp import TwirpError

MAX_HEADER_NAME: Final = 255
MAX_MEDIA_TIMEOUT_S: Final = 3600
# RFC 3261 25.1 token characters.
_TOKEN: Final = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
# Headers a trunk may not set (the gateway owns them): livekit's ForbiddenSipHeaderNames.
FORBIDDEN_HEADERS: Final = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "allow",
        "allow-events",
        "call-id",
        "contact",
        "content-encoding",
        "content-length",
        "content-type",
        "cseq",
        "event",
        "expires",
        "from",
        "max-forwards",
        "record-route",
        "refer-to",
        "reply-to",
        "k",
        "l",
        "m",
        "o",
        "r",
        "t",
        "u",
        "v",
    }
)


def invalid(msg: str) -> TwirpError:
    return TwirpError("invalid_argument", msg)


def check_header_name(name: str, restricted: bool) -> None:
    if not name:
        raise invalid("invalid header name: header name cannot be empty")
    if len(name) > MAX_HEADER_NAME:
        raise invalid("invalid header name: header name too long (max 255 characters)")
    if not _TOKEN.match(name):
        raise invalid(f"invalid header name: header name {name} contains invalid characters")
    if restricted and name.lower() in FORBIDDEN_HEADERS:
        raise invalid(f"invalid header name: header name {name} not supported")


def check_headers(
    headers: Mapping[str, str],
    headers_to_attributes: Mapping[str, str],
    attributes_to_headers: Mapping[str, str],
) -> None:
    for name, value in headers.items():
        check_header_name(name, restricted=True)
        if any(c in value for c in "\r\n\0"):
            raise invalid(f"invalid header value for {name}: contains a line break")
    for name in attributes_to_headers.values():
        check_header_name(name, restricted=False)
    for name in headers_to_attributes:
        check_header_name(name, restricted=False)


def check_media(media: sip.SIPMediaConfig | None) -> None:
    if media is None:
        return
    for codec in media.codecs:
        if not codec.name:
            raise invalid("missing codec name")
        if any(c in codec.name for c in " \t\n\r"):
            raise invalid("invalid codec name")
        if "/" in codec.name:
            raise invalid("codec name must not contain '/'")
    if media.HasField("media_timeout"):
        seconds = media.media_timeout.ToTimedelta().total_seconds()
        if seconds < 0:
            raise invalid("media_timeout must not be negative")
        if seconds > MAX_MEDIA_TIMEOUT_S:
            raise invalid("media_timeout must not exceed 1h0m0s")


def _media_of(msg: sip.SIPInboundTrunkInfo | sip.SIPOutboundTrunkInfo) -> sip.SIPMediaConfig | None:
    return msg.media if msg.HasField("media") else None


def check_inbound_trunk(trunk: sip.SIPInboundTrunkInfo) -> None:
    has_auth = bool(trunk.auth_username or trunk.auth_password)
    if not has_auth and not trunk.allowed_addresses and not trunk.numbers:
        raise invalid(
            "for security, one of the fields must be set: "
            "AuthUsername+AuthPassword, AllowedAddresses or Numbers"
        )
    check_media(_media_of(trunk))
    check_headers(trunk.headers, trunk.headers_to_attributes, trunk.attributes_to_headers)


def check_hostname(value: str, field_name: str) -> None:
    if "transport=" in value:
        raise invalid(f"{field_name} should not contain transport parameter")
    if any(c in value for c in "@;") or value.startswith(("sip:", "sips:")):
        raise invalid(f"{field_name} should be a hostname or IP, not SIP URI")


def check_outbound_trunk(trunk: sip.SIPOutboundTrunkInfo) -> None:
    if not trunk.numbers:
        raise invalid("no trunk numbers specified")
    if not trunk.address:
        raise invalid("no outbound address specified")
    check_hostname(trunk.address, "trunk address")
    check_hostname(trunk.from_host, "from_host")
    check_headers(trunk.headers, trunk.headers_to_attributes, trunk.attributes_to_headers)
    check_media(_media_of(trunk))


def check_list_update(update: models.ListUpdate | None) -> None:
    if update is None:
        return
    change = len(update.set) + len(update.add) + len(update.remove) > 0
    if not update.clear and not change:
        raise invalid("unsupported list update operation")
    if update.clear and change:
        raise invalid("cannot clear and change the list at the same time")
    if update.set and (update.add or update.remove):
        raise invalid("cannot set and change the list at the same time")
    for items in (update.set, update.add, update.remove):
        if any(not v for v in items):
            raise invalid("empty element in the list")


def apply_list_update(current: list[str], update: models.ListUpdate | None) -> list[str]:
    """livekit's `applyListUpdate`: clear, or set, or remove then add (no duplicates)."""
    if update is None:
        return list(current)
    if update.clear:
        return []
    if update.set:
        return list(update.set)
    out = [v for v in current]
    for v in update.remove:
        if v in out:
            out.remove(v)
    for v in update.add:
        if v not in out:
            out.append(v)
    return out


def check_dispatch_rule(rule: sip.SIPDispatchRuleInfo) -> None:
    if not rule.HasField("rule") or rule.rule.WhichOneof("rule") is None:
        raise invalid("missing rule")
    check_media(rule.media if rule.HasField("media") else None)


def upgrade_media(
    info: sip.SIPInboundTrunkInfo | sip.SIPOutboundTrunkInfo | sip.SIPDispatchRuleInfo,
) -> None:
    """livekit's `Upgrade()`: the legacy media_encryption field moves into `media` (which is set,
    possibly empty, afterwards)."""
    media = info.media
    if not media.HasField("encryption") and info.media_encryption != sip.SIP_MEDIA_ENCRYPT_DISABLE:
        media.encryption = info.media_encryption
    info.media.SetInParent()
