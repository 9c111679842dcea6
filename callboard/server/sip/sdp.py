"""SDP offer/answer for one audio stream (RFC 4566, RFC 3264): what a caller offers, and the
answer the gateway sends (one voice codec plus telephone-event)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

# Static payload types (RFC 3551) and the codecs we speak, most preferred first.
PCMU: Final = 0
PCMA: Final = 8
G722: Final = 9
STATIC_NAMES: Final = {PCMU: "PCMU", PCMA: "PCMA", G722: "G722"}
SUPPORTED_CODECS: Final = ("PCMU", "PCMA")
TELEPHONE_EVENT: Final = "telephone-event"
DEFAULT_DTMF_PT: Final = 101
PTIME_MS: Final = 20
DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")


class SdpError(ValueError):
    """An offer we cannot answer (no audio, no common codec, bad syntax): 488."""


@dataclass
class MediaOffer:
    """The audio part of an offer or answer."""

    address: str
    port: int
    payload_types: list[int]
    rtpmap: dict[int, str] = field(default_factory=dict)
    """payload type → encoding name (upper-case), e.g. {0: "PCMU", 101: "TELEPHONE-EVENT"}."""
    direction: str = "sendrecv"

    def codec_pt(self, name: str) -> int | None:
        for pt in self.payload_types:
            if self.rtpmap.get(pt, STATIC_NAMES.get(pt, "")) == name.upper():
                return pt
        return None

    def dtmf_pts(self) -> set[int]:
        return {pt for pt, enc in self.rtpmap.items() if enc == TELEPHONE_EVENT.upper()}


def parse(body: bytes) -> MediaOffer:
    """The first audio stream of an SDP body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError("SDP is not UTF-8") from None
    session_address, session_direction = "", "sendrecv"
    offer: MediaOffer | None = None
    for raw in text.splitlines():
        line = raw.strip()
        kind, _, value = line.partition("=")
        if kind == "c":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"bad connection line {line[:60]!r}")
            if offer is None:
                session_address = parts[2]
            else:
                offer.address = parts[2]
        elif kind == "m":
            if offer is not None:
                break  # only the first audio stream
            offer = _media_line(value, session_address, session_direction)
        elif kind == "a" and offer is not None:
            _attribute(offer, value)
        elif kind == "a" and value in DIRECTIONS:
            session_direction = value  # a session-level direction applies to every stream
    if offer is None:
        raise SdpError("no audio stream in the offer")
    if not offer.address:
        raise SdpError("no connection address for the audio stream")
    return offer


def _media_line(value: str, address: str, direction: str) -> MediaOffer:
    parts = value.split()
    if len(parts) < 4 or parts[0] != "audio" or not parts[1].split("/")[0].isdigit():
        raise SdpError(f"unsupported media line {value[:60]!r}")
    pts = []
    for pt in parts[3:]:
        if not pt.isdigit() or int(pt) > 127:
            raise SdpError(f"bad payload type {pt[:10]!r}")
        pts.append(int(pt))
    port = int(parts[1].split("/")[0])
    return MediaOffer(address=address, port=port, payload_types=pts, direction=direction)


def _attribute(offer: MediaOffer, value: str) -> None:
    name, _, rest = value.partition(":")
    if name == "rtpmap":
        pt, _, encoding = rest.partition(" ")
        if pt.isdigit():
            offer.rtpmap[int(pt)] = encoding.split("/")[0].upper()
    elif name in DIRECTIONS:
        offer.direction = name


def answer_direction(offered: str) -> str:
    """RFC 3264 §6.1: sendonly ↔ recvonly, inactive stays, sendrecv stays."""
    return {"sendonly": "recvonly", "recvonly": "sendonly"}.get(offered, offered)


@dataclass(frozen=True)
class Answer:
    """What we send back: our address and port, the codec chosen, the DTMF payload type."""

    address: str
    port: int
    codec: str
    codec_pt: int
    dtmf_pt: int | None
    direction: str = "sendrecv"
    session_id: int = field(default_factory=lambda: secrets.randbelow(2**31))

    def encode(self, version: int = 1) -> bytes:
        pts = [str(self.codec_pt)] + ([str(self.dtmf_pt)] if self.dtmf_pt is not None else [])
        lines = [
            "v=0",
            f"o=callboard {self.session_id} {version} IN IP4 {self.address}",
            "s=callboard",
            f"c=IN IP4 {self.address}",
            "t=0 0",
            f"m=audio {self.port} RTP/AVP {' '.join(pts)}",
            f"a=rtpmap:{self.codec_pt} {self.codec}/8000",
        ]
        if self.dtmf_pt is not None:
            lines += [
                f"a=rtpmap:{self.dtmf_pt} telephone-event/8000",
                f"a=fmtp:{self.dtmf_pt} 0-16",
            ]
        lines += [f"a=ptime:{PTIME_MS}", f"a={self.direction}"]
        return ("\r\n".join(lines) + "\r\n").encode()


def choose(offer: MediaOffer, address: str, port: int) -> Answer:
    """Our answer to `offer`: the first codec we support in the caller's order of preference."""
    for pt in offer.payload_types:
        name = offer.rtpmap.get(pt, STATIC_NAMES.get(pt, ""))
        if name in SUPPORTED_CODECS:
            dtmf = sorted(offer.dtmf_pts())
            return Answer(
                address=address,
                port=port,
                codec=name,
                codec_pt=pt,
                dtmf_pt=dtmf[0] if dtmf else None,
                direction=answer_direction(offer.direction),
            )
    raise SdpError("no common codec: we speak PCMU and PCMA")


def offer(address: str, port: int, dtmf_pt: int = DEFAULT_DTMF_PT) -> bytes:
    """Our own offer (outbound calls): PCMU, PCMA and telephone-event."""
    lines = [
        "v=0",
        f"o=callboard {secrets.randbelow(2**31)} 1 IN IP4 {address}",
        "s=callboard",
        f"c=IN IP4 {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {PCMU} {PCMA} {dtmf_pt}",
        f"a=rtpmap:{PCMU} PCMU/8000",
        f"a=rtpmap:{PCMA} PCMA/8000",
        f"a=rtpmap:{dtmf_pt} telephone-event/8000",
        f"a=fmtp:{dtmf_pt} 0-16",
        f"a=ptime:{PTIME_MS}",
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()
