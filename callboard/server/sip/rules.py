"""Which trunk and dispatch rule an inbound call matches, and what the call becomes in the room:
livekit/protocol `sip/sip.go` (MatchTrunkDetailed, MatchDispatchRuleIter, DispatchRulePriority,
EvaluateDispatchRule, ValidateTrunksIter, ValidateDispatchRulesIter) as pure functions.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from livekit.protocol import room as room_pb
from livekit.protocol import sip

from callboard.server.ids import new_id
from callboard.server.sip.phone_numbers import normalize_number, number_in

# Participant attributes (livekit/protocol `livekit/attrs.go`).
ATTR_CALL_ID: Final = "sip.callID"
ATTR_TRUNK_ID: Final = "sip.trunkID"
ATTR_RULE_ID: Final = "sip.ruleID"
ATTR_PHONE_NUMBER: Final = "sip.phoneNumber"
ATTR_HOSTNAME: Final = "sip.hostname"
ATTR_TRUNK_NUMBER: Final = "sip.trunkPhoneNumber"
ATTR_CALL_STATUS: Final = "sip.callStatus"

OPEN_PRIORITY: Final = 100
ANY_NUMBER_PENALTY: Final = 1000
LAST_PRIORITY: Final = 2**31 - 1
HIDDEN_NUMBER_DIGITS: Final = 4
_MASK_FORBIDDEN: Final = frozenset("()+*;, \t\n\r")
NO_RULE_MATCHED: Final = "No SIP Dispatch Rules defined"


class RuleError(Exception):
    """A refusal with the Twirp code livekit gives it (`failed_precondition`, ...)."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


@dataclass(frozen=True)
class InboundCall:
    """What the gateway knows of an INVITE when it picks a trunk and a rule."""

    call_id: str
    """LiveKit's call id (`SCL_…`)."""
    from_user: str
    from_host: str
    to_user: str
    source_ip: str
    pin: str = ""
    no_pin: bool = False
    extra_attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dispatch:
    """The evaluated rule: where the caller goes and as whom (livekit's
    `EvaluateSIPDispatchRulesResponse`)."""

    trunk_id: str
    rule_id: str
    request_pin: bool
    room_name: str = ""
    identity: str = ""
    name: str = ""
    metadata: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    room_preset: str = ""
    room_config: room_pb.RoomConfiguration | None = None
    headers_to_attributes: Mapping[str, str] = field(default_factory=dict)
    include_headers: int = 0
    """The trunk's `SIPHeaderOptions`: which INVITE headers become `sip.h.*` attributes."""


def pin_and_room(rule: sip.SIPDispatchRuleInfo) -> tuple[str, str]:
    """(room name or prefix, pin) of a rule; an unknown kind of rule is `invalid_argument`."""
    kind = rule.rule.WhichOneof("rule")
    if kind == "dispatch_rule_direct":
        d = rule.rule.dispatch_rule_direct
        return d.room_name, d.pin
    if kind == "dispatch_rule_individual":
        i = rule.rule.dispatch_rule_individual
        return i.room_prefix, i.pin
    if kind == "dispatch_rule_callee":
        c = rule.rule.dispatch_rule_callee
        return c.room_prefix, c.pin
    raise RuleError("invalid_argument", "unsupported SIP Dispatch Rule: <nil>")


def rule_priority(rule: sip.SIPDispatchRuleInfo) -> int:
    """Lower wins: pin-protected direct 0, individual 1, callee 2; open ones 100/101/102; +1000
    for no inbound_numbers and +1000 for no numbers."""
    kind = rule.rule.WhichOneof("rule")
    order = ("dispatch_rule_direct", "dispatch_rule_individual", "dispatch_rule_callee")
    if kind not in order:
        return LAST_PRIORITY
    _, pin = pin_and_room(rule)
    priority = order.index(kind) + (0 if pin else OPEN_PRIORITY)
    if not rule.inbound_numbers:
        priority += ANY_NUMBER_PENALTY
    if not rule.numbers:
        priority += ANY_NUMBER_PENALTY
    return priority


def _sort_key(rule: sip.SIPDispatchRuleInfo) -> tuple[int, str]:
    return rule_priority(rule), pin_and_room(rule)[0]


def _print_id(rule_or_trunk_id: str) -> str:
    return rule_or_trunk_id or "<new>"


def _print_numbers(numbers: Iterable[str]) -> str:
    listed = list(numbers)
    if not listed:
        return "<any>"
    return "[" + " ".join(f'"{n}"' for n in listed) + "]"


def check_trunk_conflicts(trunks: Iterable[sip.SIPInboundTrunkInfo]) -> None:
    """Two inbound trunks may not claim the same called number for the same calling numbers."""
    by_number: dict[str, dict[str, sip.SIPInboundTrunkInfo]] = {}
    for trunk in trunks:
        keys = dict.fromkeys(normalize_number(n) for n in trunk.numbers) or {"": None}
        for key in keys:
            _check_trunk_inbound(by_number.setdefault(key, {}), trunk)


def _check_trunk_inbound(
    by_calling: dict[str, sip.SIPInboundTrunkInfo], trunk: sip.SIPInboundTrunkInfo
) -> None:
    if not trunk.allowed_numbers:
        other = by_calling.get("")
        if other is not None and other.sip_trunk_id != trunk.sip_trunk_id:
            raise RuleError(
                "invalid_argument",
                f'Conflicting inbound SIP Trunks: "{_print_id(trunk.sip_trunk_id)}" and '
                f'"{_print_id(other.sip_trunk_id)}", using the same number(s) '
                f"{_print_numbers(trunk.numbers)} without AllowedNumbers set",
            )
        by_calling[""] = trunk
        return
    for number in dict.fromkeys(trunk.allowed_numbers):
        key = normalize_number(number)
        other = by_calling.get(key)
        if other is not None and other.sip_trunk_id != trunk.sip_trunk_id:
            raise RuleError(
                "invalid_argument",
                f'Conflicting inbound SIP Trunks: "{_print_id(trunk.sip_trunk_id)}" and '
                f'"{_print_id(other.sip_trunk_id)}", using the same number(s) '
                f'{_print_numbers(trunk.numbers)} and AllowedNumber "{number}"',
            )
        by_calling[key] = trunk


def check_rule_conflicts(rules: Iterable[sip.SIPDispatchRuleInfo]) -> None:
    """Two rules may not share a (trunk, inbound number, number, pin) combination."""
    seen: dict[tuple[str, str, str, str], sip.SIPDispatchRuleInfo] = {}
    for rule in rules:
        _, pin = pin_and_room(rule)
        for trunk in rule.trunk_ids or [""]:
            for inbound in rule.inbound_numbers or [""]:
                for number in rule.numbers or [""]:
                    key = (pin, trunk, normalize_number(inbound), normalize_number(number))
                    other = seen.get(key)
                    if other is not None:
                        raise RuleError(
                            "invalid_argument",
                            "Dispatch rule for the same trunk, inbound number, number, and PIN "
                            "combination already exists in dispatch rule "
                            f'"{_print_id(other.sip_dispatch_rule_id)}" '
                            f'"{other.name or "<blank name>"}"',
                        )
                    seen[key] = rule


def _valid_mask(mask: str) -> bool:
    return not any(c in _MASK_FORBIDDEN for c in mask) and "://" not in mask


def _address_allowed(source_ip: str, host: str, masks: Iterable[str]) -> bool:
    try:
        ip = ipaddress.ip_address(source_ip)
    except ValueError:
        return True
    valid = [m for m in masks if _valid_mask(m)]
    if not valid:
        return True
    for mask in valid:
        if mask == host:
            return True
        try:
            if "/" in mask:
                if ip in ipaddress.ip_network(mask, strict=False):
                    return True
            elif ip == ipaddress.ip_address(mask):
                return True
        except ValueError:
            continue
    return False


def match_trunk(
    trunks: Iterable[sip.SIPInboundTrunkInfo], call: InboundCall
) -> sip.SIPInboundTrunkInfo | None:
    """The trunk for this call: one listing the called number wins over a default one (no
    numbers); the calling number and source address must be allowed. None when no trunk
    matches; two matching trunks are `failed_precondition`."""
    called = normalize_number(call.to_user)
    selected: sip.SIPInboundTrunkInfo | None = None
    defaults: list[sip.SIPInboundTrunkInfo] = []
    for trunk in trunks:
        if not number_in(call.from_user, list(trunk.allowed_numbers)):
            continue
        if not _address_allowed(call.source_ip, call.from_host, trunk.allowed_addresses):
            continue
        if not trunk.numbers:
            defaults.append(trunk)
            continue
        if any(n == call.to_user or normalize_number(n) == called for n in trunk.numbers):
            if selected is not None:
                raise RuleError(
                    "failed_precondition", f'Multiple SIP Trunks matched for "{call.to_user}"'
                )
            selected = trunk
    if selected is not None:
        return selected
    if len(defaults) > 1:
        raise RuleError(
            "failed_precondition", f'Multiple default SIP Trunks matched for "{call.to_user}"'
        )
    return defaults[0] if defaults else None


def match_dispatch_rule(
    trunk: sip.SIPInboundTrunkInfo | None,
    rules: Iterable[sip.SIPDispatchRuleInfo],
    call: InboundCall,
) -> sip.SIPDispatchRuleInfo:
    """The best rule for this call: rules naming the trunk before rules for any trunk, then by
    priority; pins filter (a sent pin only matches rules with that pin). No rule is
    `failed_precondition` with livekit's message."""
    listed = list(rules)
    check_rule_conflicts(listed)
    specific: list[sip.SIPDispatchRuleInfo] = []
    default: list[sip.SIPDispatchRuleInfo] = []
    for rule in listed:
        if rule.inbound_numbers and call.from_user not in rule.inbound_numbers:
            continue
        if rule.numbers and call.to_user not in rule.numbers:
            continue
        _, pin = pin_and_room(rule)
        if call.no_pin and pin:
            continue
        if not call.no_pin and call.pin and pin != call.pin:
            continue
        if not rule.trunk_ids:
            default.append(rule)
        elif trunk is not None and trunk.sip_trunk_id in rule.trunk_ids:
            specific.append(rule)
    for candidates in (specific, default):
        if candidates:
            return min(candidates, key=_sort_key)
    # livekit reports every miss this way: its error sets NoRules whenever nothing matched.
    raise RuleError("failed_precondition", NO_RULE_MATCHED)


def evaluate_dispatch_rule(
    trunk: sip.SIPInboundTrunkInfo | None, rule: sip.SIPDispatchRuleInfo, call: InboundCall
) -> Dispatch:
    """Room, identity, name and attributes of the caller under `rule`."""
    trunk_id = trunk.sip_trunk_id if trunk is not None else ""
    attrs = dict(rule.attributes)
    attrs.update(call.extra_attributes)
    attrs[ATTR_CALL_ID] = call.call_id
    attrs[ATTR_TRUNK_ID] = trunk_id
    from_user = call.from_user
    identity = "sip_" + from_user
    if rule.hide_phone_number:
        identity = "sip_" + hashlib.sha256(from_user.encode()).hexdigest()[:16]
        shown = HIDDEN_NUMBER_DIGITS if len(from_user) > HIDDEN_NUMBER_DIGITS else 1
        from_user = from_user[-shown:]
    else:
        attrs[ATTR_PHONE_NUMBER] = call.from_user
        attrs[ATTR_HOSTNAME] = call.from_host
        attrs[ATTR_TRUNK_NUMBER] = call.to_user
    room, pin = pin_and_room(rule)
    if pin and not call.pin:
        return Dispatch(trunk_id=trunk_id, rule_id=rule.sip_dispatch_rule_id, request_pin=True)
    if pin and pin != call.pin:
        raise RuleError("permission_denied", "Incorrect PIN for SIP room")
    kind = rule.rule.WhichOneof("rule")
    if kind == "dispatch_rule_individual":
        individual = rule.rule.dispatch_rule_individual
        room = f"{individual.room_prefix}_{from_user}" if individual.room_prefix else from_user
        if not individual.no_randomness:
            room += "_" + new_id("")
    elif kind == "dispatch_rule_callee":
        callee = rule.rule.dispatch_rule_callee
        room = f"{callee.room_prefix}_{call.to_user}" if callee.room_prefix else call.to_user
        if callee.randomize:
            room += "_" + new_id("")
    attrs[ATTR_RULE_ID] = rule.sip_dispatch_rule_id
    return Dispatch(
        trunk_id=trunk_id,
        rule_id=rule.sip_dispatch_rule_id,
        request_pin=False,
        room_name=room,
        identity=identity,
        name="Phone " + from_user,
        metadata=rule.metadata,
        attributes=attrs,
        room_preset=rule.room_preset,
        room_config=rule.room_config if rule.HasField("room_config") else None,
        headers_to_attributes=dict(trunk.headers_to_attributes) if trunk is not None else {},
        include_headers=trunk.include_headers if trunk is not None else 0,
    )
