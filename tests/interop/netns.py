"""A private network namespace for tests with WebRTC media.

libwebrtc (inside the official rtc SDK) ignores loopback interfaces: with only 127.0.0.1 it
gathers no ICE candidate at all and `Room.connect` fails ("wait_pc_connection timed out"). In
the machine's own namespace it would use the machine's real interfaces instead. So a media test
runs in a process that calls `enter_private_network()` first: the process moves to a new, empty
network namespace (Linux `unshare(CLONE_NEWNET)`, root only) that holds the loopback interface
and one veth pair with MEDIA_IP on one end. Servers listen on 127.0.0.1 there, WebRTC media uses
MEDIA_IP, and nothing can reach or leave the machine: the namespace has no route anywhere else.
It needs no teardown: the kernel frees it (and its veth pair) when its last process exits.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from typing import Final

CLONE_NEWNET: Final = 0x40000000
MEDIA_IP: Final = "10.200.0.1"
MEDIA_PREFIX_LEN: Final = 24
VETH: Final = ("cbmedia0", "cbmedia1")
IP_COMMAND_TIMEOUT_S: Final = 10.0
SKIP_EXIT: Final = 77


class NetnsUnavailable(Exception):
    """This machine cannot give the test a private network namespace (tests skip)."""


def unavailable_reason() -> str | None:
    """Why `enter_private_network` cannot work here (checked without changing anything)."""
    if not sys.platform.startswith("linux"):
        return "media tests need a Linux network namespace"
    if os.geteuid() != 0:
        return "media tests create a private network namespace and need root"
    if shutil.which("ip") is None:
        return "media tests need the `ip` command (iproute2) to set up a network namespace"
    return None


def enter_private_network() -> None:
    """Move the calling thread (and every thread and process it starts later) into a new network
    namespace with `lo` up and MEDIA_IP on a veth interface. Call it before starting threads."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsUnavailable(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    a, b = VETH
    for args in (
        ["link", "set", "lo", "up"],
        ["link", "add", a, "type", "veth", "peer", "name", b],
        ["link", "set", a, "addrgenmode", "none"],
        ["link", "set", b, "addrgenmode", "none"],
        ["addr", "add", f"{MEDIA_IP}/{MEDIA_PREFIX_LEN}", "dev", a],
        ["link", "set", a, "up"],
        ["link", "set", b, "up"],
    ):
        done = subprocess.run(
            ["ip", *args],
            capture_output=True,
            text=True,
            timeout=IP_COMMAND_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def main(argv: list[str]) -> int:
    """`python -m tests.interop.netns CMD...`: run CMD in a private network namespace; exit 77
    (with the reason on stderr) when one cannot be had."""
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        print(f"no private network namespace: {e}", file=sys.stderr)
        return SKIP_EXIT
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
