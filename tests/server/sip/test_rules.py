"""Trunk and dispatch-rule choice, and what an inbound call becomes in the room, held to
livekit's own code. Each row names its source: `sip.go:N` is livekit/protocol `sip/sip.go`
line N, and `attrs.go:N` is `livekit/attrs.go`, at v1.50.5-0.20260728075222 (the protocol that
livekit-server v1.13.5 builds with; livekit-sip calls these same functions for each INVITE)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import pytest
from livekit.protocol import sip

from callboard.server.sip import rules
from callboard.server.sip.phone_numbers import normalize_number
from callboard.server.sip.rules import InboundCall, RuleError

CALLER = "+56975231235"
CALLED = "+15550100"
RANDOM_12 = r"[2-9A-HJ-NP-Za-km-z]{12}"


def call(**changes: str | bool) -> InboundCall:
    values: dict[str, object] = {
        "call_id": "SCL_test",
        "from_user": CALLER,
        "from_host": "10.0.0.1",
        "to_user": CALLED,
        "source_ip": "127.0.0.1",
    }
    values.update(changes)
    return InboundCall(**values)  # type: ignore[arg-type]


def individual(prefix: str = "", pin: str = "", no_randomness: bool = False) -> sip.SIPDispatchRule:
    return sip.SIPDispatchRule(
        dispatch_rule_individual=sip.SIPDispatchRuleIndividual(
            room_prefix=prefix, pin=pin, no_randomness=no_randomness
        )
    )


def direct(room: str, pin: str = "") -> sip.SIPDispatchRule:
    return sip.SIPDispatchRule(
        dispatch_rule_direct=sip.SIPDispatchRuleDirect(room_name=room, pin=pin)
    )


def callee(prefix: str = "", pin: str = "", randomize: bool = False) -> sip.SIPDispatchRule:
    return sip.SIPDispatchRule(
        dispatch_rule_callee=sip.SIPDispatchRuleCallee(
            room_prefix=prefix, pin=pin, randomize=randomize
        )
    )


def rule(rule_id: str, kind: sip.SIPDispatchRule, **fields: object) -> sip.SIPDispatchRuleInfo:
    return sip.SIPDispatchRuleInfo(sip_dispatch_rule_id=rule_id, rule=kind, **fields)  # type: ignore[arg-type]


@dataclass
class RoomRow:
    source: str
    rule: sip.SIPDispatchRuleInfo
    room: str
    """A regular expression the room name must match in full."""
    call: InboundCall = field(default_factory=call)


ROOMS = [
    RoomRow(
        "sip.go:935-940 individual: prefix _ caller _ 12 random",
        rule("R", individual("call-")),
        rf"call-_\+56975231235_{RANDOM_12}",
    ),
    RoomRow(
        "sip.go:935 individual without prefix: caller _ random",
        rule("R", individual()),
        rf"\+56975231235_{RANDOM_12}",
    ),
    RoomRow(
        "sip.go:939 individual no_randomness",
        rule("R", individual("call", no_randomness=True)),
        r"call_\+56975231235",
    ),
    RoomRow("sip.go:281 direct: the fixed room", rule("R", direct("lobby")), "lobby"),
    RoomRow(
        "sip.go:943-945 callee: prefix _ called number", rule("R", callee("to")), r"to_\+15550100"
    ),
    RoomRow(
        "sip.go:947 callee randomize", rule("R", callee(randomize=True)), rf"\+15550100_{RANDOM_12}"
    ),
    RoomRow(
        "sip.go:886 hide_phone_number: the room uses the last 4 digits",
        rule("R", individual("call-"), hide_phone_number=True),
        rf"call-_1235_{RANDOM_12}",
    ),
]


@pytest.mark.parametrize("row", ROOMS, ids=[r.source for r in ROOMS])
def test_room_names(row: RoomRow) -> None:
    dispatch = rules.evaluate_dispatch_rule(None, row.rule, row.call)
    assert re.fullmatch(row.room, dispatch.room_name), dispatch.room_name


def test_caller_identity_name_and_attributes() -> None:
    """sip.go:873-894 and 951: identity `sip_<caller>`, name `Phone <caller>`, the sip.* attributes
    (names from attrs.go:8-24), the rule's attributes and metadata."""
    trunk = sip.SIPInboundTrunkInfo(sip_trunk_id="ST_trunk", numbers=[CALLED])
    chosen = rule("SDR_rule", individual("call-"), attributes={"team": "sales"}, metadata="m")
    dispatch = rules.evaluate_dispatch_rule(trunk, chosen, call())
    assert (dispatch.identity, dispatch.name, dispatch.metadata) == (
        "sip_+56975231235",
        "Phone +56975231235",
        "m",
    )
    assert dispatch.attributes == {
        "team": "sales",
        "sip.callID": "SCL_test",
        "sip.trunkID": "ST_trunk",
        "sip.phoneNumber": CALLER,
        "sip.hostname": "10.0.0.1",
        "sip.trunkPhoneNumber": CALLED,
        "sip.ruleID": "SDR_rule",
    }


def test_hidden_number() -> None:
    """sip.go:880-890: identity is sip_ + 16 hex digits of sha256(caller), name shows the last 4
    digits, and the number, host and called number are left out of the attributes."""
    dispatch = rules.evaluate_dispatch_rule(
        None, rule("R", individual(), hide_phone_number=True), call()
    )
    assert dispatch.identity == "sip_" + hashlib.sha256(CALLER.encode()).hexdigest()[:16]
    assert dispatch.name == "Phone 1235"
    assert not {"sip.phoneNumber", "sip.hostname", "sip.trunkPhoneNumber"} & set(
        dispatch.attributes
    )


def test_short_hidden_number_shows_one_digit() -> None:
    """sip.go:886-888: a number of 4 digits or fewer shows only its last digit."""
    dispatch = rules.evaluate_dispatch_rule(
        None, rule("R", direct("x"), hide_phone_number=True), call(from_user="123")
    )
    assert dispatch.name == "Phone 3"


def test_pin_rules() -> None:
    """sip.go:909-926: a pin-protected rule asks for the pin first; a wrong pin is refused."""
    protected = rule("R", direct("vault", pin="4321"))
    assert rules.evaluate_dispatch_rule(None, protected, call()).request_pin
    with pytest.raises(RuleError) as refused:
        rules.evaluate_dispatch_rule(None, protected, call(pin="0000"))
    assert refused.value.code == "permission_denied"
    assert rules.evaluate_dispatch_rule(None, protected, call(pin="4321")).room_name == "vault"


@dataclass
class PriorityRow:
    source: str
    rule: sip.SIPDispatchRuleInfo
    priority: int


NUMBERS = {"inbound_numbers": [CALLER], "numbers": [CALLED]}
PRIORITIES = [
    PriorityRow("sip.go:87 direct with pin", rule("R", direct("r", "1"), **NUMBERS), 0),
    PriorityRow("sip.go:93 individual with pin", rule("R", individual(pin="1"), **NUMBERS), 1),
    PriorityRow("sip.go:99 callee with pin", rule("R", callee(pin="1"), **NUMBERS), 2),
    PriorityRow("sip.go:89 open direct", rule("R", direct("r"), **NUMBERS), 100),
    PriorityRow("sip.go:95 open individual", rule("R", individual(), **NUMBERS), 101),
    PriorityRow("sip.go:101 open callee", rule("R", callee(), **NUMBERS), 102),
    PriorityRow(
        "sip.go:105 no inbound_numbers: +1000", rule("R", individual(), numbers=[CALLED]), 1101
    ),
    PriorityRow("sip.go:105-108 neither list: +2000", rule("R", individual()), 2101),
]


@pytest.mark.parametrize("row", PRIORITIES, ids=[r.source for r in PRIORITIES])
def test_rule_priority(row: PriorityRow) -> None:
    assert rules.rule_priority(row.rule) == row.priority


@dataclass
class MatchRow:
    source: str
    rules: list[sip.SIPDispatchRuleInfo]
    chosen: str | None
    """The id of the rule that wins, or None when the call is refused."""
    call: InboundCall = field(default_factory=call)


TRUNK = sip.SIPInboundTrunkInfo(sip_trunk_id="ST_trunk", numbers=[CALLED])
MATCHES = [
    MatchRow(
        "sip.go:803-826 a rule naming the trunk beats a wildcard one",
        [rule("any", direct("a")), rule("mine", individual(), trunk_ids=["ST_trunk"])],
        "mine",
    ),
    MatchRow(
        "sip.go:815 a rule for another trunk is skipped",
        [rule("other", individual(), trunk_ids=["ST_other"]), rule("any", callee())],
        "any",
    ),
    MatchRow(
        "sip.go:113-125 lower priority value wins: direct over individual",
        [rule("ind", individual()), rule("dir", direct("a"), numbers=[CALLED])],
        "dir",
    ),
    MatchRow(
        "sip.go:775 inbound_numbers must list the caller",
        [rule("vip", direct("v"), inbound_numbers=["+1999"]), rule("any", individual())],
        "any",
    ),
    MatchRow(
        "sip.go:778 numbers must list the called number",
        [rule("n", direct("v"), numbers=["+1999"])],
        None,
    ),
    MatchRow(
        "sip.go:793-800 a sent pin only matches the rule with that pin",
        [rule("open", individual()), rule("pin", direct("p", "42"))],
        "pin",
        call(pin="42"),
    ),
    MatchRow(
        "sip.go:788 no_pin skips pin-protected rules",
        [rule("pin", direct("p", "42")), rule("open", callee())],
        "open",
        call(no_pin=True),
    ),
    MatchRow("sip.go:823-826 nothing matches: refused", [], None),
]


@pytest.mark.parametrize("row", MATCHES, ids=[r.source for r in MATCHES])
def test_dispatch_rule_choice(row: MatchRow) -> None:
    if row.chosen is None:
        with pytest.raises(RuleError) as refused:
            rules.match_dispatch_rule(TRUNK, row.rules, row.call)
        assert (refused.value.code, refused.value.msg) == (
            "failed_precondition",
            "No SIP Dispatch Rules defined",
        )
        return
    assert rules.match_dispatch_rule(TRUNK, row.rules, row.call).sip_dispatch_rule_id == row.chosen


@dataclass
class TrunkRow:
    source: str
    trunks: list[sip.SIPInboundTrunkInfo]
    chosen: str | None
    call: InboundCall = field(default_factory=call)


def trunk(trunk_id: str, **fields: object) -> sip.SIPInboundTrunkInfo:
    return sip.SIPInboundTrunkInfo(sip_trunk_id=trunk_id, **fields)  # type: ignore[arg-type]


TRUNKS = [
    TrunkRow(
        "sip.go:551-566 a trunk for the called number beats a default one",
        [trunk("default", auth_username="u"), trunk("mine", numbers=[CALLED])],
        "mine",
    ),
    TrunkRow(
        "sip.go:558 numbers compare normalized", [trunk("mine", numbers=["1 (555) 0100"])], "mine"
    ),
    TrunkRow(
        "sip.go:541 the caller must be an allowed number",
        [trunk("mine", numbers=[CALLED], allowed_numbers=["+1999"])],
        None,
    ),
    TrunkRow(
        "sip.go:546 the source address must be allowed",
        [trunk("mine", numbers=[CALLED], allowed_addresses=["10.9.0.0/16"])],
        None,
    ),
    TrunkRow(
        "sip.go:446-460 a CIDR that holds the source allows it",
        [trunk("mine", numbers=[CALLED], allowed_addresses=["127.0.0.0/8"])],
        "mine",
    ),
    TrunkRow(
        "sip.go:455 the caller's host name may be listed",
        [trunk("mine", numbers=[CALLED], allowed_addresses=["10.0.0.1"])],
        "mine",
    ),
    TrunkRow("sip.go: no trunk at all", [], None),
]


@pytest.mark.parametrize("row", TRUNKS, ids=[r.source for r in TRUNKS])
def test_trunk_choice(row: TrunkRow) -> None:
    found = rules.match_trunk(row.trunks, row.call)
    assert (found.sip_trunk_id if found else None) == row.chosen


def test_two_trunks_for_one_number_are_refused() -> None:
    """sip.go:566 and 592: a call that two trunks (or two default trunks) claim is refused."""
    for pair in (
        [trunk("a", numbers=[CALLED]), trunk("b", numbers=[CALLED])],
        [trunk("a", auth_username="u"), trunk("b", auth_username="v")],
    ):
        with pytest.raises(RuleError) as refused:
            rules.match_trunk(pair, call())
        assert refused.value.code == "failed_precondition"


@pytest.mark.parametrize(
    ("number", "normalized"),
    [("+1 (555) 010-0", "+15550100"), ("15550100", "+15550100"), ("alice", "alice"), ("", "")],
)
def test_normalize_number(number: str, normalized: str) -> None:
    """livekit/sip.go NormalizeNumber: digits get a +, formatting goes, other users stay."""
    assert normalize_number(number) == normalized
