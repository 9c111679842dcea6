"""SIP digest authentication (RFC 3261 §22, RFC 2617 MD5 with qop=auth): the gateway's 407
challenges and their check, and the answer a client computes. Nonces are stateless (a time and
an HMAC under a per-process key), so a flood of INVITEs costs no memory."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

from callboard.server.sip.message import parse_params, split_commas

NONCE_TTL_S: Final = 300.0
DEFAULT_REALM: Final = "callboard"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def digest_response(
    *,
    username: str,
    password: str,
    realm: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str = "",
    nc: str = "",
    cnonce: str = "",
) -> str:
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


def parse_credentials(header: str) -> dict[str, str]:
    """`Digest username="a", realm="b", ...` → its parameters (names lower-cased)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    return parse_params(";".join(split_commas(rest)))


class DigestAuth:
    """Issues and checks challenges for one gateway."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def nonce(self, now: float | None = None) -> str:
        stamp = f"{int(now if now is not None else time.time()):x}"
        mac = hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{stamp}.{mac}"

    def _fresh(self, nonce: str, now: float) -> bool:
        stamp, _, mac = nonce.partition(".")
        expected = hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        if not hmac.compare_digest(mac, expected):
            return False
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        return 0 <= now - issued <= NONCE_TTL_S

    def challenge(self, realm: str) -> str:
        """A Proxy-Authenticate value."""
        return f'Digest realm="{realm}", nonce="{self.nonce()}", algorithm=MD5'

    def check(self, header: str, *, method: str, username: str, password: str, realm: str) -> bool:
        """Whether a Proxy-Authorization answers one of our fresh challenges with this user's
        password. Constant-time on the digest."""
        creds = parse_credentials(header)
        if not creds or creds.get("username") != username or creds.get("realm") != realm:
            return False
        nonce = creds.get("nonce", "")
        if not self._fresh(nonce, time.time()):
            return False
        expected = digest_response(
            username=username,
            password=password,
            realm=realm,
            method=method,
            uri=creds.get("uri", ""),
            nonce=nonce,
            qop=creds.get("qop", ""),
            nc=creds.get("nc", ""),
            cnonce=creds.get("cnonce", ""),
        )
        return hmac.compare_digest(expected, creds.get("response", ""))


@dataclass(frozen=True)
class Challenge:
    realm: str
    nonce: str
    qop: str

    @classmethod
    def parse(cls, header: str) -> Challenge:
        params = parse_credentials(header)
        qops = [q.strip() for q in params.get("qop", "").split(",") if q.strip()]
        return cls(
            params.get("realm", ""), params.get("nonce", ""), "auth" if "auth" in qops else ""
        )

    def answer(self, *, username: str, password: str, method: str, uri: str) -> str:
        """A (Proxy-)Authorization value for this challenge."""
        cnonce, nc = secrets.token_hex(8), "00000001"
        response = digest_response(
            username=username,
            password=password,
            realm=self.realm,
            method=method,
            uri=uri,
            nonce=self.nonce,
            qop=self.qop,
            nc=nc,
            cnonce=cnonce,
        )
        text = (
            f'Digest username="{username}", realm="{self.realm}", nonce="{self.nonce}", '
            f'uri="{uri}", response="{response}", algorithm=MD5'
        )
        if self.qop:
            text += f', qop={self.qop}, nc={nc}, cnonce="{cnonce}"'
        return text
