"""Which of this host's addresses WebRTC media can use.

libwebrtc (inside LiveKit's SDKs) ignores loopback candidates, so media needs an interface
address; aiortc gathers every non-loopback one (the same rule, `aioice.ice.get_host_addresses`).
"""

from __future__ import annotations

from typing import Final

from aioice.ice import get_host_addresses

NO_MEDIA_ADDRESS: Final = (
    "no network interface address usable for WebRTC media: this host has only loopback "
    "addresses, which LiveKit's SDKs ignore; bring up an interface with an address (a veth in "
    "a network namespace is enough for tests)"
)


def media_addresses() -> list[str]:
    """The addresses aiortc will offer as ICE host candidates."""
    return [a for a in get_host_addresses(use_ipv4=True, use_ipv6=True) if not _loopback(a)]


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"
