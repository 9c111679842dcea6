"""In-memory store of SIP trunks and dispatch rules, listed as livekit-server lists them
(filtered, sorted by id, `Pagination` after_id/limit)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, TypeVar

from google.protobuf.message import Message
from livekit.protocol import models, sip

from callboard.server.sip.phone_numbers import normalize_number

TRUNK_PREFIX: Final = "ST_"
RULE_PREFIX: Final = "SDR_"
CALL_PREFIX: Final = "SCL_"

M = TypeVar("M", bound=Message)


def _page(items: Iterable[tuple[str, M]], page: models.Pagination | None) -> list[M]:
    """Sorted by id, after `page.after_id`, at most `page.limit` items."""
    chosen = sorted(items, key=lambda kv: kv[0])
    if page is not None and page.after_id:
        chosen = [(k, v) for k, v in chosen if k > page.after_id]
    if page is not None and page.limit > 0:
        chosen = chosen[: page.limit]
    return [_copy(v) for _, v in chosen]


def _copy(msg: M) -> M:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


class SipStore:
    """Trunks and rules by id; what is handed out is a copy, never the stored message."""

    def __init__(self) -> None:
        self.inbound: dict[str, sip.SIPInboundTrunkInfo] = {}
        self.outbound: dict[str, sip.SIPOutboundTrunkInfo] = {}
        self.rules: dict[str, sip.SIPDispatchRuleInfo] = {}

    def inbound_trunk(self, trunk_id: str) -> sip.SIPInboundTrunkInfo | None:
        found = self.inbound.get(trunk_id)
        return _copy(found) if found is not None else None

    def outbound_trunk(self, trunk_id: str) -> sip.SIPOutboundTrunkInfo | None:
        found = self.outbound.get(trunk_id)
        return _copy(found) if found is not None else None

    def rule(self, rule_id: str) -> sip.SIPDispatchRuleInfo | None:
        found = self.rules.get(rule_id)
        return _copy(found) if found is not None else None

    def list_inbound(self, req: sip.ListSIPInboundTrunkRequest) -> list[sip.SIPInboundTrunkInfo]:
        ids, numbers = set(req.trunk_ids), list(req.numbers)
        wanted = {normalize_number(n) for n in numbers}

        def keep(t: sip.SIPInboundTrunkInfo) -> bool:
            if ids and t.sip_trunk_id not in ids:
                return False
            if numbers and t.numbers:
                return any(n in numbers or normalize_number(n) in wanted for n in t.numbers)
            return True

        page = req.page if req.HasField("page") else None
        return _page(((k, t) for k, t in self.inbound.items() if keep(t)), page)

    def list_outbound(self, req: sip.ListSIPOutboundTrunkRequest) -> list[sip.SIPOutboundTrunkInfo]:
        ids, numbers = set(req.trunk_ids), set(req.numbers)

        def keep(t: sip.SIPOutboundTrunkInfo) -> bool:
            if ids and t.sip_trunk_id not in ids:
                return False
            return not (numbers and t.numbers) or any(n in numbers for n in t.numbers)

        page = req.page if req.HasField("page") else None
        return _page(((k, t) for k, t in self.outbound.items() if keep(t)), page)

    def list_rules(self, req: sip.ListSIPDispatchRuleRequest) -> list[sip.SIPDispatchRuleInfo]:
        ids, trunks = set(req.dispatch_rule_ids), set(req.trunk_ids)

        def keep(r: sip.SIPDispatchRuleInfo) -> bool:
            if ids and r.sip_dispatch_rule_id not in ids:
                return False
            return not (trunks and r.trunk_ids) or any(t in trunks for t in r.trunk_ids)

        page = req.page if req.HasField("page") else None
        return _page(((k, r) for k, r in self.rules.items() if keep(r)), page)

    def put_inbound(self, trunk: sip.SIPInboundTrunkInfo) -> None:
        self.inbound[trunk.sip_trunk_id] = _copy(trunk)

    def put_outbound(self, trunk: sip.SIPOutboundTrunkInfo) -> None:
        self.outbound[trunk.sip_trunk_id] = _copy(trunk)

    def put_rule(self, rule: sip.SIPDispatchRuleInfo) -> None:
        self.rules[rule.sip_dispatch_rule_id] = _copy(rule)

    def delete_trunk(self, trunk_id: str) -> None:
        self.inbound.pop(trunk_id, None)
        self.outbound.pop(trunk_id, None)

    def delete_rule(self, rule_id: str) -> None:
        self.rules.pop(rule_id, None)
