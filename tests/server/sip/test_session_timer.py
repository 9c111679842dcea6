"""What the gateway answers to the session timer an INVITE asks for (RFC 4028 §9), row by row;
livekit-sip has no session timers, so the RFC is the reference."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from callboard.server.sip.message import SipMessage
from callboard.server.sip.session_timer import IntervalTooSmall, SessionTimer, negotiate


def invite(*headers: tuple[str, str]) -> SipMessage:
    msg = SipMessage(method="INVITE", uri="sip:+15550100@127.0.0.1")
    for name, value in headers:
        msg.add(name, value)
    return msg


class Row(NamedTuple):
    source: str
    headers: tuple[tuple[str, str], ...]
    timer: SessionTimer | None


ROWS = [
    Row("§9 no Session-Expires: no timer", (("Supported", "timer"),), None),
    Row(
        "§9 refresher=uas is honoured",
        (("Supported", "timer"), ("Session-Expires", "1800;refresher=uas")),
        SessionTimer(1800, "uas", True),
    ),
    Row(
        "§9 no refresher named: the caller, which supports timers, refreshes",
        (("Supported", "100rel, timer"), ("Session-Expires", "1800")),
        SessionTimer(1800, "uac", True),
    ),
    Row(
        "§9 Require: timer counts as support; compact form x",
        (("Require", "timer"), ("x", "600;refresher=uac")),
        SessionTimer(600, "uac", True),
    ),
    Row(
        "§9 a caller without timer support cannot refresh: we do, and require nothing",
        (("Session-Expires", "1800;refresher=uac"),),
        SessionTimer(1800, "uas", False),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.source for r in ROWS])
def test_negotiated_session(row: Row) -> None:
    assert negotiate(invite(*row.headers)) == row.timer


def test_the_200_ok_states_the_session_and_requires_timer_only_when_supported() -> None:
    assert SessionTimer(1800, "uas", True).headers() == {
        "Session-Expires": "1800;refresher=uas",
        "Require": "timer",
    }
    assert SessionTimer(1800, "uas", False).headers() == {"Session-Expires": "1800;refresher=uas"}


def test_refresh_half_way_and_expiry_a_third_or_32_s_early() -> None:
    """§7.4 refresh at half the interval; §10 BYE at interval - min(32, interval / 3)."""
    assert SessionTimer(1800, "uas", True).refresh_after == 900
    assert SessionTimer(1800, "uac", True).expires_after == 1768
    assert SessionTimer(90, "uac", True).expires_after == 60


def test_an_interval_below_min_se_is_too_small() -> None:
    with pytest.raises(IntervalTooSmall, match="90"):
        negotiate(invite(("Supported", "timer"), ("Session-Expires", "89")))
