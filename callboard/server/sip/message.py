"""SIP messages (RFC 3261 §7, §20, §25): parse one request or response from bytes, build and
serialise replies. Malformed input raises `SipParseError`; nothing here does I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

SIP_VERSION: Final = "SIP/2.0"
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 256
MAX_CSEQ: Final = 2**31 - 1
CRLF: Final = "\r\n"

# RFC 3261 §7.3.3 compact forms, and the spelling we write each header with.
COMPACT: Final = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "r": "Refer-To",
    "b": "Referred-By",
    "o": "Event",
    "u": "Allow-Events",
    "x": "Session-Expires",
}
CANONICAL: Final = {
    name.lower(): name
    for name in (
        *COMPACT.values(),
        "CSeq",
        "Max-Forwards",
        "Allow",
        "Require",
        "Proxy-Require",
        "Unsupported",
        "Route",
        "Record-Route",
        "Reason",
        "User-Agent",
        "Server",
        "WWW-Authenticate",
        "Proxy-Authenticate",
        "Authorization",
        "Proxy-Authorization",
        "Retry-After",
        "Min-SE",
        "Expires",
        "Accept",
        "Timestamp",
    )
}
# Headers whose comma-separated values are separate entries (RFC 3261 §7.3.1).
MULTI_VALUED: Final = frozenset(
    {"via", "contact", "route", "record-route", "allow", "supported", "require", "unsupported"}
)
_TOKEN: Final = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
# sent-protocol allows LWS around its slashes (RFC 3261 §25.1 SLASH).
_VIA: Final = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+(.+)$", re.I | re.S)
_REQUEST_URI: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>]+$")
_STATUS_LINE: Final = re.compile(r"^SIP/2\.0 ([1-6]\d\d) ?(.*)$", re.IGNORECASE)

REASONS: Final = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    422: "Session Interval Too Small",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
}


class SipParseError(ValueError):
    """The bytes are not a SIP message we can answer; the text says what is wrong."""


def canonical(name: str) -> str:
    lower = name.lower()
    if lower in COMPACT:
        return COMPACT[lower]
    return CANONICAL.get(lower, name)


def split_commas(value: str) -> list[str]:
    """Split a header value on commas outside quotes and angle brackets."""
    parts, start, quoted, angle, escaped = [], 0, False, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            angle = True
        elif not quoted and ch == ">":
            angle = False
        elif ch == "," and not quoted and not angle:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def parse_params(text: str) -> dict[str, str]:
    """`;a=1;b;c="x"` → {"a": "1", "b": "", "c": "x"} (names lower-cased)."""
    params: dict[str, str] = {}
    for item in _split_unquoted(text, ";"):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        params[name.strip().lower()] = value
    return params


def _split_unquoted(text: str, sep: str) -> list[str]:
    parts, start, quoted = [], 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


@dataclass(frozen=True)
class SipUri:
    """`sip:user@host:port;params` (and `sips:`, `tel:`)."""

    scheme: str
    user: str
    host: str
    port: int | None = None
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SipUri:
        scheme, sep, rest = text.strip().partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in ("sip", "sips", "tel"):
            raise SipParseError(f"unsupported URI scheme in {text[:80]!r}")
        rest = rest.split("?", 1)[0]
        main, *param_parts = rest.split(";")
        params = parse_params(";".join(param_parts))
        if scheme == "tel":
            return cls(scheme, main, "", None, params)
        user, at, hostport = main.rpartition("@")
        if not at:
            user, hostport = "", main
        user = user.split(":", 1)[0]
        host, port = _host_port(hostport)
        return cls(scheme, user, host, port, params)

    def __str__(self) -> str:
        text = f"{self.scheme}:"
        if self.user:
            text += f"{self.user}@" if self.scheme != "tel" else self.user
        text += self.host
        if self.port is not None:
            text += f":{self.port}"
        for name, value in self.params.items():
            text += f";{name}={value}" if value else f";{name}"
        return text


def _host_port(text: str) -> tuple[str, int | None]:
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference in {text[:80]!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c.isspace() for c in host):
        raise SipParseError(f"invalid host in {text[:80]!r}")
    if not port_text:
        return host.lower(), None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SipParseError(f"invalid port in {text[:80]!r}")
    return host.lower(), int(port_text)


@dataclass(frozen=True)
class NameAddr:
    """A From/To/Contact/Refer-To value: display name, URI and header parameters (tag...)."""

    display: str
    uri: SipUri
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        lt = _find_unquoted(text, "<")
        if lt >= 0:
            gt = text.find(">", lt)
            if gt < 0:
                raise SipParseError(f"unterminated <URI> in {text[:80]!r}")
            display = text[:lt].strip().strip('"')
            return cls(display, SipUri.parse(text[lt + 1 : gt]), parse_params(text[gt + 1 :]))
        uri_text, _, params = text.partition(";")
        return cls("", SipUri.parse(uri_text), parse_params(params))

    @property
    def tag(self) -> str:
        return self.params.get("tag", "")

    def __str__(self) -> str:
        display = f'"{self.display}" ' if self.display else ""
        params = "".join(f";{k}={v}" if v else f";{k}" for k, v in self.params.items())
        return f"{display}<{self.uri}>{params}"


def _find_unquoted(text: str, ch: str) -> int:
    quoted, escaped = False, False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ch and not quoted:
            return i
    return -1


@dataclass(frozen=True)
class Via:
    """One Via entry: `SIP/2.0/UDP host:port;branch=...;rport`."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Via:
        found = _VIA.match(text)
        if found is None:
            raise SipParseError(f"invalid Via protocol in {text[:80]!r}")
        sent_by, *params = found.group(2).strip().split(";", 1)
        host, port = _host_port(sent_by)
        return cls(found.group(1).upper(), host, port, parse_params(params[0] if params else ""))

    @property
    def branch(self) -> str:
        return self.params.get("branch", "")


@dataclass
class SipMessage:
    """A request (`method` set) or a response (`status` set), headers in order."""

    method: str = ""
    uri: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        wanted = canonical(name).lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split for list headers."""
        wanted = canonical(name).lower()
        values: list[str] = []
        for key, value in self.headers:
            if key.lower() == wanted:
                values.extend(split_commas(value) if wanted in MULTI_VALUED else [value])
        return values

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.headers.append((canonical(name), value))

    def add(self, name: str, value: str) -> None:
        self.headers.append((canonical(name), value))

    def remove(self, name: str) -> None:
        wanted = canonical(name).lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != wanted]

    @property
    def call_id(self) -> str:
        return self.get("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.get("CSeq").strip().partition(" ")
        return int(number), method.strip().upper()

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self.get("From"))

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self.get("To"))

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.get_all("Via")]

    def encode(self) -> bytes:
        start = (
            f"{self.method} {self.uri} {SIP_VERSION}"
            if self.is_request
            else f"{SIP_VERSION} {self.status} {self.reason}"
        )
        lines = [start]
        lines.extend(f"{k}: {v}" for k, v in self.headers if k.lower() != "content-length")
        lines.append(f"Content-Length: {len(self.body)}")
        return (CRLF.join(lines) + CRLF + CRLF).encode() + self.body


def reply(request: SipMessage, status: int, reason: str = "", to_tag: str = "") -> SipMessage:
    """A response to `request` (RFC 3261 §8.2.6): its Via, From, To (+ tag), Call-ID, CSeq."""
    response = SipMessage(status=status, reason=reason or REASONS.get(status, ""))
    for via in request.get_all("Via"):
        response.add("Via", via)
    response.add("From", request.get("From"))
    to = request.get("To")
    if to_tag and "tag=" not in to.lower():
        to = f"{to};tag={to_tag}"
    response.add("To", to)
    response.add("Call-ID", request.call_id)
    response.add("CSeq", request.get("CSeq"))
    return response


def _unfold(head: str) -> Iterator[str]:
    current: str | None = None
    for line in head.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and current is not None:
            current += " " + line.strip()
            continue
        if current is not None:
            yield current
        current = line
    if current is not None:
        yield current


def _parse_start(line: str, msg: SipMessage) -> None:
    status = _STATUS_LINE.match(line)
    if status:
        msg.status, msg.reason = int(status.group(1)), status.group(2).strip()
        return
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError(f"malformed start line {line[:80]!r}")
    method, uri, version = parts
    if not _TOKEN.match(method):
        raise SipParseError(f"invalid method {method[:40]!r}")
    if not version.upper().startswith("SIP/"):
        raise SipParseError(f"malformed start line {line[:80]!r}")
    if version.upper() != SIP_VERSION:
        raise UnsupportedVersion(version)
    if not _REQUEST_URI.match(uri):
        raise SipParseError(f"invalid Request-URI {uri[:80]!r}")
    msg.method, msg.uri = method, uri


class UnsupportedVersion(SipParseError):
    """A request in a SIP version other than 2.0 (answered 505)."""


def _parse_headers(lines: Iterable[str], msg: SipMessage) -> None:
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not _TOKEN.match(name):
            raise SipParseError(f"malformed header line {line[:80]!r}")
        msg.headers.append((canonical(name), value.strip()))
        if len(msg.headers) > MAX_HEADERS:
            raise SipParseError(f"more than {MAX_HEADERS} headers")


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) at the blank line that ends the headers; None if it has not arrived."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end], data[end + 4 :]
    end = data.find(b"\n\n")
    if end >= 0:
        return data[:end], data[end + 2 :]
    return None


def parse(data: bytes, *, stream: bool = False) -> SipMessage:
    """One SIP message. Over a datagram (`stream=False`) the body is what follows the headers,
    cut to Content-Length; over a stream the caller framed the message with Content-Length."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipParseError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    parts = split_head(data.lstrip(b"\r\n"))
    if parts is None:
        raise SipParseError("no blank line after the headers")
    head_bytes, rest = parts
    head = head_bytes.decode("utf-8", errors="replace")
    lines = _unfold(head)
    msg = SipMessage()
    _parse_start(next(lines, ""), msg)
    _parse_headers(lines, msg)
    length_text = msg.get("Content-Length")
    if length_text:
        if not length_text.isdigit():
            raise SipParseError(f"invalid Content-Length {length_text[:20]!r}")
        length = int(length_text)
        if length > len(rest):
            raise SipParseError("body shorter than Content-Length")
        msg.body = rest[:length]
    elif stream:
        raise SipParseError("Content-Length is required over a stream transport")
    else:
        msg.body = rest
    _check_mandatory(msg)
    return msg


def _check_mandatory(msg: SipMessage) -> None:
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        if not msg.get(name):
            raise SipParseError(f"missing {name} header")
    number, method = msg.get("CSeq").strip().partition(" ")[::2]
    if not number.isdigit() or int(number) > MAX_CSEQ or not _TOKEN.match(method.strip()):
        raise SipParseError(f"invalid CSeq {msg.get('CSeq')[:40]!r}")
    if msg.is_request and method.strip().upper() != msg.method.upper():
        raise SipParseError("CSeq method does not match the request method")
    if msg.get("Max-Forwards") and not msg.get("Max-Forwards").isdigit():
        raise SipParseError("invalid Max-Forwards")
    for via in msg.get_all("Via"):
        Via.parse(via)
    for name in ("From", "To"):
        NameAddr.parse(msg.get(name))
