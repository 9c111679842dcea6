"""Session timers (RFC 4028) for calls we answer: what the INVITE asks for, what the 200 OK
says, and when the session must be refreshed or ended. livekit-sip does not implement them (it
neither lists `timer` in Supported nor refreshes); the gateway does, so that a trunk that
requires them is not refused and a session it expects us to refresh is refreshed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from callboard.server.sip.message import SipMessage

MIN_SE_S: Final = 90
"""RFC 4028 §4: the smallest interval allowed (and our Min-SE)."""
MAX_BYE_MARGIN_S: Final = 32.0
"""§10: the side that does not refresh ends the session this long (or a third of it) early."""
UAS: Final = "uas"
UAC: Final = "uac"


class IntervalTooSmall(Exception):
    """§9: answer 422 with our Min-SE."""


@dataclass(frozen=True)
class SessionTimer:
    """A negotiated session: `interval` seconds, refreshed by `refresher` ("uac": the
    caller, "uas": us)."""

    interval: int
    refresher: str
    caller_supports: bool
    """The caller said `timer` in Supported or Require: the 200 OK then requires it."""

    @property
    def we_refresh(self) -> bool:
        return self.refresher == UAS

    @property
    def refresh_after(self) -> float:
        """§7.4: the refresher refreshes half way through."""
        return self.interval / 2

    @property
    def expires_after(self) -> float:
        """§10: without a refresh by then, the session is over."""
        return self.interval - min(MAX_BYE_MARGIN_S, self.interval / 3)

    def headers(self) -> dict[str, str]:
        """What the 200 OK carries."""
        headers = {"Session-Expires": f"{self.interval};refresher={self.refresher}"}
        if self.caller_supports:
            headers["Require"] = "timer"
        return headers


def _tags(msg: SipMessage, name: str) -> set[str]:
    return {t.strip().lower() for v in msg.get_all(name) for t in v.split(",")}


def negotiate(invite: SipMessage, min_se: int = MIN_SE_S) -> SessionTimer | None:
    """§9 at the UAS: None when the INVITE asks for no session timer; IntervalTooSmall when
    it asks for less than `min_se`. Without a refresher named, the caller refreshes when it
    supports timers, else we do (it could not)."""
    value = invite.get("Session-Expires")
    if not value:
        return None
    interval_text, *params = [p.strip() for p in value.split(";")]
    if not interval_text.isdigit():
        return None
    interval = int(interval_text)
    if interval < min_se:
        raise IntervalTooSmall(str(min_se))
    supports = "timer" in _tags(invite, "Supported") | _tags(invite, "Require")
    refresher = ""
    for param in params:
        name, _, given = param.partition("=")
        if name.strip().lower() == "refresher":
            refresher = given.strip().lower()
    if refresher not in (UAC, UAS) or not supports:
        refresher = UAC if supports else UAS
    return SessionTimer(interval, refresher, supports)
