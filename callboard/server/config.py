"""Configuration of the embedded server: a validated, frozen dataclass plus key parsing."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

DEV_API_KEY: Final = "devkey"
DEV_API_SECRET: Final = "secret"
DEFAULT_PORT: Final = 7880
KEYS_ENV: Final = "LIVEKIT_KEYS"

# Protocol timings, as livekit-server uses them.
REGISTER_TIMEOUT_S: Final = 10.0
AVAILABILITY_TIMEOUT_S: Final = 10.0
TOKEN_LEEWAY_S: Final = 60.0
AGENT_TOKEN_TTL_S: Final = 3600.0
# How long a disconnected worker's jobs wait for a MigrateJobRequest before they fail.
MIGRATION_GRACE_S: Final = 15.0
# Largest /agent frame accepted; a larger one closes that connection (1009).
MAX_AGENT_FRAME_BYTES: Final = 1 << 20
MAX_TWIRP_BODY_BYTES: Final = 1 << 20
ROOM_EMPTY_TIMEOUT_S: Final = 300
ROOM_DEPARTURE_TIMEOUT_S: Final = 20
RTC_ANSWER_TIMEOUT_S: Final = 15.0
"""livekit-server's negotiationFailedTimeout."""
RTC_JOIN_TIMEOUT_S: Final = 60.0
"""livekit-server removes a participant not connected a minute after its join (JoinTimeout)."""


class ConfigError(ValueError):
    """An invalid server option; the message names the option and how to fix it."""


def parse_keys(text: str) -> dict[str, str]:
    """Parse `"key: secret"` pairs separated by commas or newlines (LIVEKIT_KEYS format)."""
    keys: dict[str, str] = {}
    items = [raw.strip() for raw in text.replace(",", "\n").splitlines() if raw.strip()]
    for number, item in enumerate(items, start=1):
        key, sep, secret = item.partition(":")
        key, secret = key.strip(), secret.strip()
        if not sep or not key or not secret:
            # Name the entry by its key only when it was told apart: never echo a secret.
            which = f"for key {key!r}" if sep and key else f"#{number}"
            raise ConfigError(
                f"invalid API key entry {which}: expected 'key: secret' (--keys or {KEYS_ENV})"
            )
        keys[key] = secret
    return keys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """How `callboard server` listens, who it trusts, and its protocol timings."""

    host: str = "127.0.0.1"
    """Address to listen on; non-loopback with the dev keys requires `dev=True`."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (the bound port is reported by the server)."""
    keys: Mapping[str, str] = field(default_factory=dict)
    """API key → secret. Empty means the dev pair devkey/secret."""
    dev: bool = False
    """Allow the dev keys on a non-loopback address."""
    region: str = "local"
    """Reported in RegisterWorkerResponse.server_info.region."""
    register_timeout: float = REGISTER_TIMEOUT_S
    """Seconds a new /agent connection has to send `register`."""
    availability_timeout: float = AVAILABILITY_TIMEOUT_S
    """Seconds a worker has to answer an AvailabilityRequest before the next is tried."""
    migration_grace: float = MIGRATION_GRACE_S
    """Seconds a disconnected worker's jobs wait for a MigrateJobRequest."""
    token_leeway: float = TOKEN_LEEWAY_S
    """Clock skew tolerated on token exp/nbf."""
    rtc_answer_timeout: float = RTC_ANSWER_TIMEOUT_S
    """Seconds an /rtc client has to answer a subscriber renegotiation before its connection
    ends (the first offer is bounded by `rtc_join_timeout`)."""
    rtc_join_timeout: float = RTC_JOIN_TIMEOUT_S
    """Seconds an /rtc client has after its join to answer the first subscriber offer."""
    sip_port: int | None = None
    """UDP/TCP port of the SIP gateway on `host` (0 picks a free one); None: no gateway."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "register_timeout",
            "availability_timeout",
            "migration_grace",
            "rtc_answer_timeout",
            "rtc_join_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sip_port is not None and not 0 <= self.sip_port <= 65535:
            raise ConfigError(f"sip_port must be in 0..65535, got {self.sip_port}")
        if self.token_leeway < 0:
            raise ConfigError(f"token_leeway must be >= 0, got {self.token_leeway}")
        if self.uses_dev_keys and not self.dev and not _is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} with the public dev keys: "
                f"pass --keys 'key: secret' (or set {KEYS_ENV}), or --dev to accept the risk"
            )

    @property
    def uses_dev_keys(self) -> bool:
        return not self.keys

    @property
    def effective_keys(self) -> Mapping[str, str]:
        return self.keys or {DEV_API_KEY: DEV_API_SECRET}

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        """Defaults < LIVEKIT_KEYS < explicit overrides (what the CLI passes)."""
        values: dict[str, object] = {}
        env_keys = os.environ.get(KEYS_ENV)
        if env_keys:
            values["keys"] = parse_keys(env_keys)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
