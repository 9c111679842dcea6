"""How the SIP gateway listens and what it allows: a validated, frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_SIP_PORT: Final = 5060
RINGING_TIMEOUT_S: Final = 180.0
"""livekit-sip's defaultRingingTimeout (pkg/sip/participant.go): 3 minutes to subscribe."""
T1_S: Final = 0.5
"""RFC 3261 timer T1 (round-trip estimate); retransmits double from it up to T2."""
T2_S: Final = 4.0
TRANSACTION_LIFETIME_S: Final = 64 * T1_S


class SipConfigError(ValueError):
    """An invalid SIP option; the message names it."""


@dataclass(frozen=True)
class SipConfig:
    """The gateway's address, limits and timings."""

    host: str = "127.0.0.1"
    """Address for SIP (UDP and TCP) and RTP."""
    port: int = DEFAULT_SIP_PORT
    """SIP port, UDP and TCP; 0 picks a free one."""
    max_calls: int = 200
    """Calls at once; an INVITE past this is answered 503."""
    invites_per_second: float = 50.0
    """New INVITEs accepted per second (a burst of as many); more are answered 503."""
    max_transactions: int = 10_000
    """Server transactions remembered for retransmissions; past this new requests get 503."""
    ringing_timeout: float = RINGING_TIMEOUT_S
    """Seconds a call rings waiting for someone in the room to subscribe to it."""
    realm: str = "callboard"
    """Digest realm for trunks that set none."""
    min_session_expires: int = 90
    """Min-SE (RFC 4028): shorter session intervals are answered 422; 90 s is the RFC's."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SipConfigError(f"sip port must be in 0..65535, got {self.port}")
        for name in (
            "max_calls",
            "invites_per_second",
            "max_transactions",
            "ringing_timeout",
            "min_session_expires",
        ):
            if getattr(self, name) <= 0:
                raise SipConfigError(f"sip {name} must be > 0, got {getattr(self, name)}")
