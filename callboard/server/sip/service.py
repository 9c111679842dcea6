"""`livekit.SIP` Twirp service: inbound/outbound trunks and dispatch rules (create, get, list,
update, delete) and the call methods, with livekit-server's grants (`sip.admin` to manage,
`sip.call` to dial or transfer) and its validation (livekit-server `pkg/service/sip.go`).

Trunk passwords are stored and answered as livekit-server does, and never logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Protocol, TypeVar

from google.protobuf.message import Message
from livekit.protocol import sip

from callboard.log import get_logger
from callboard.server.auth import Grants
from callboard.server.ids import new_id
from callboard.server.sip import rules, validation
from callboard.server.sip.store import RULE_PREFIX, TRUNK_PREFIX, SipStore
from callboard.server.sip.validation import invalid
from callboard.server.twirp import Handler, TwirpError, TwirpRouter

log = get_logger("server.sip")
M = TypeVar("M", bound=Message)

SIP_SERVICE: Final = "livekit.SIP"
PERMISSION_DENIED: Final = "permissions denied"
TRUNK_NOT_FOUND: Final = "requested sip trunk does not exist"
RULE_NOT_FOUND: Final = "requested sip dispatch rule does not exist"


class CallControl(Protocol):
    """What places and transfers calls (the gateway's user agent)."""

    async def create_participant(
        self, req: sip.CreateSIPParticipantRequest, trunk: sip.SIPOutboundTrunkInfo | None
    ) -> sip.SIPParticipantInfo: ...

    async def transfer_participant(
        self, req: sip.TransferSIPParticipantRequest
    ) -> sip.TransferSIPParticipantResponse: ...


def require_sip(grants: Grants | None, grant: str) -> None:
    """livekit-server's EnsureSIPAdminPermission / EnsureSIPCallPermission."""
    if grants is None or not grants.sip.get(grant):
        raise TwirpError("unauthenticated", PERMISSION_DENIED)


def _rule_error(e: rules.RuleError) -> TwirpError:
    return TwirpError(e.code, e.msg)


def _check_trunks(trunks: Iterable[sip.SIPInboundTrunkInfo]) -> None:
    try:
        rules.check_trunk_conflicts(trunks)
    except rules.RuleError as e:
        raise _rule_error(e) from None


def _check_rules(found: Iterable[sip.SIPDispatchRuleInfo]) -> None:
    try:
        rules.check_rule_conflicts(found)
    except rules.RuleError as e:
        raise _rule_error(e) from None


class SipService:
    """The Twirp handlers over one `SipStore`; calls go to `calls` when a gateway is running."""

    def __init__(self, store: SipStore, calls: CallControl | None = None) -> None:
        self.store = store
        self.calls = calls

    def install(self, router: TwirpRouter) -> None:
        methods: dict[str, tuple[type[Message], Handler]] = {
            "CreateSIPInboundTrunk": (sip.CreateSIPInboundTrunkRequest, self.create_inbound),
            "CreateSIPOutboundTrunk": (sip.CreateSIPOutboundTrunkRequest, self.create_outbound),
            "UpdateSIPInboundTrunk": (sip.UpdateSIPInboundTrunkRequest, self.update_inbound),
            "UpdateSIPOutboundTrunk": (sip.UpdateSIPOutboundTrunkRequest, self.update_outbound),
            "GetSIPInboundTrunk": (sip.GetSIPInboundTrunkRequest, self.get_inbound),
            "GetSIPOutboundTrunk": (sip.GetSIPOutboundTrunkRequest, self.get_outbound),
            "ListSIPInboundTrunk": (sip.ListSIPInboundTrunkRequest, self.list_inbound),
            "ListSIPOutboundTrunk": (sip.ListSIPOutboundTrunkRequest, self.list_outbound),
            "DeleteSIPTrunk": (sip.DeleteSIPTrunkRequest, self.delete_trunk),
            "CreateSIPDispatchRule": (sip.CreateSIPDispatchRuleRequest, self.create_rule),
            "UpdateSIPDispatchRule": (sip.UpdateSIPDispatchRuleRequest, self.update_rule),
            "ListSIPDispatchRule": (sip.ListSIPDispatchRuleRequest, self.list_rules),
            "DeleteSIPDispatchRule": (sip.DeleteSIPDispatchRuleRequest, self.delete_rule),
            "CreateSIPParticipant": (sip.CreateSIPParticipantRequest, self.create_participant),
            "TransferSIPParticipant": (
                sip.TransferSIPParticipantRequest,
                self.transfer_participant,
            ),
        }
        for name, (request_type, handler) in methods.items():
            router.add(SIP_SERVICE, name, request_type, handler)

    # -- trunks ------------------------------------------------------------------------------

    async def create_inbound(
        self, grants: Grants | None, req: sip.CreateSIPInboundTrunkRequest
    ) -> sip.SIPInboundTrunkInfo:
        require_sip(grants, "admin")
        if not req.HasField("trunk"):
            raise invalid("missing trunk")
        trunk = req.trunk
        if trunk.sip_trunk_id:
            raise invalid("trunk id must not be set")
        validation.check_inbound_trunk(trunk)
        others = self.store.list_inbound(sip.ListSIPInboundTrunkRequest(numbers=trunk.numbers))
        _check_trunks([*others, trunk])
        trunk.sip_trunk_id = new_id(TRUNK_PREFIX)
        self.store.put_inbound(trunk)
        log.info("sip inbound trunk created", extra={"trunk_id": trunk.sip_trunk_id})
        return trunk

    async def create_outbound(
        self, grants: Grants | None, req: sip.CreateSIPOutboundTrunkRequest
    ) -> sip.SIPOutboundTrunkInfo:
        require_sip(grants, "admin")
        if not req.HasField("trunk"):
            raise invalid("missing trunk")
        trunk = req.trunk
        if trunk.sip_trunk_id:
            raise invalid("trunk id must not be set")
        validation.check_outbound_trunk(trunk)
        trunk.sip_trunk_id = new_id(TRUNK_PREFIX)
        self.store.put_outbound(trunk)
        log.info("sip outbound trunk created", extra={"trunk_id": trunk.sip_trunk_id})
        return trunk

    async def update_inbound(
        self, grants: Grants | None, req: sip.UpdateSIPInboundTrunkRequest
    ) -> sip.SIPInboundTrunkInfo:
        require_sip(grants, "admin")
        action = _check_update(req.sip_trunk_id, req.WhichOneof("action"), "trunk")
        if action == "replace" and req.replace.sip_trunk_id not in ("", req.sip_trunk_id):
            raise invalid("trunk id in the info must be empty or match the id in the update")
        if action == "update":
            _check_inbound_update(req.update)
        info = _found(self.store.inbound_trunk(req.sip_trunk_id), TRUNK_NOT_FOUND)
        if action == "replace":
            info.CopyFrom(req.replace)
            info.sip_trunk_id = req.sip_trunk_id
        else:
            _apply_inbound_update(info, req.update)
        validation.check_inbound_trunk(info)
        others = self.store.list_inbound(sip.ListSIPInboundTrunkRequest(numbers=info.numbers))
        _check_trunks(info if t.sip_trunk_id == info.sip_trunk_id else t for t in others)
        self.store.put_inbound(info)
        log.info("sip inbound trunk updated", extra={"trunk_id": info.sip_trunk_id})
        return info

    async def update_outbound(
        self, grants: Grants | None, req: sip.UpdateSIPOutboundTrunkRequest
    ) -> sip.SIPOutboundTrunkInfo:
        require_sip(grants, "admin")
        action = _check_update(req.sip_trunk_id, req.WhichOneof("action"), "trunk")
        if action == "replace" and req.replace.sip_trunk_id not in ("", req.sip_trunk_id):
            raise invalid("trunk id in the info must be empty or match the id in the update")
        info = _found(self.store.outbound_trunk(req.sip_trunk_id), TRUNK_NOT_FOUND)
        if action == "replace":
            info.CopyFrom(req.replace)
            info.sip_trunk_id = req.sip_trunk_id
        else:
            _apply_outbound_update(info, req.update)
        validation.check_outbound_trunk(info)
        self.store.put_outbound(info)
        log.info("sip outbound trunk updated", extra={"trunk_id": info.sip_trunk_id})
        return info

    async def get_inbound(
        self, grants: Grants | None, req: sip.GetSIPInboundTrunkRequest
    ) -> sip.GetSIPInboundTrunkResponse:
        require_sip(grants, "admin")
        trunk = self.store.inbound_trunk(_trunk_id(req.sip_trunk_id))
        return sip.GetSIPInboundTrunkResponse(trunk=_found(trunk, TRUNK_NOT_FOUND))

    async def get_outbound(
        self, grants: Grants | None, req: sip.GetSIPOutboundTrunkRequest
    ) -> sip.GetSIPOutboundTrunkResponse:
        require_sip(grants, "admin")
        trunk = self.store.outbound_trunk(_trunk_id(req.sip_trunk_id))
        return sip.GetSIPOutboundTrunkResponse(trunk=_found(trunk, TRUNK_NOT_FOUND))

    async def list_inbound(
        self, grants: Grants | None, req: sip.ListSIPInboundTrunkRequest
    ) -> sip.ListSIPInboundTrunkResponse:
        require_sip(grants, "admin")
        return sip.ListSIPInboundTrunkResponse(items=self.store.list_inbound(req))

    async def list_outbound(
        self, grants: Grants | None, req: sip.ListSIPOutboundTrunkRequest
    ) -> sip.ListSIPOutboundTrunkResponse:
        require_sip(grants, "admin")
        return sip.ListSIPOutboundTrunkResponse(items=self.store.list_outbound(req))

    async def delete_trunk(
        self, grants: Grants | None, req: sip.DeleteSIPTrunkRequest
    ) -> sip.SIPTrunkInfo:
        require_sip(grants, "admin")
        # livekit-server answers the id whether or not such a trunk existed.
        self.store.delete_trunk(_trunk_id(req.sip_trunk_id))
        log.info("sip trunk deleted", extra={"trunk_id": req.sip_trunk_id})
        return sip.SIPTrunkInfo(sip_trunk_id=req.sip_trunk_id)

    # -- dispatch rules ----------------------------------------------------------------------

    async def create_rule(
        self, grants: Grants | None, req: sip.CreateSIPDispatchRuleRequest
    ) -> sip.SIPDispatchRuleInfo:
        require_sip(grants, "admin")
        info = _rule_info(req)
        if req.HasField("dispatch_rule") and info.sip_dispatch_rule_id:
            raise invalid("rule id must not be set")
        validation.check_dispatch_rule(info)
        others = self.store.list_rules(sip.ListSIPDispatchRuleRequest(trunk_ids=info.trunk_ids))
        _check_rules([*others, info])
        info.sip_dispatch_rule_id = new_id(RULE_PREFIX)
        self.store.put_rule(info)
        log.info("sip dispatch rule created", extra={"rule_id": info.sip_dispatch_rule_id})
        return info

    async def update_rule(
        self, grants: Grants | None, req: sip.UpdateSIPDispatchRuleRequest
    ) -> sip.SIPDispatchRuleInfo:
        require_sip(grants, "admin")
        action = _check_update(req.sip_dispatch_rule_id, req.WhichOneof("action"), "rule")
        if action == "replace":
            if req.replace.sip_dispatch_rule_id not in ("", req.sip_dispatch_rule_id):
                raise invalid("rule id in the info must be empty or match the id in the update")
            validation.check_dispatch_rule(req.replace)
        else:
            validation.check_list_update(_field(req.update, "trunk_ids"))
        info = _found(self.store.rule(req.sip_dispatch_rule_id), RULE_NOT_FOUND)
        if action == "replace":
            info.CopyFrom(req.replace)
            info.sip_dispatch_rule_id = req.sip_dispatch_rule_id
        else:
            _apply_rule_update(info, req.update)
        validation.check_dispatch_rule(info)
        others = self.store.list_rules(sip.ListSIPDispatchRuleRequest(trunk_ids=info.trunk_ids))
        _check_rules(
            info if r.sip_dispatch_rule_id == info.sip_dispatch_rule_id else r for r in others
        )
        self.store.put_rule(info)
        log.info("sip dispatch rule updated", extra={"rule_id": info.sip_dispatch_rule_id})
        return info

    async def list_rules(
        self, grants: Grants | None, req: sip.ListSIPDispatchRuleRequest
    ) -> sip.ListSIPDispatchRuleResponse:
        require_sip(grants, "admin")
        return sip.ListSIPDispatchRuleResponse(items=self.store.list_rules(req))

    async def delete_rule(
        self, grants: Grants | None, req: sip.DeleteSIPDispatchRuleRequest
    ) -> sip.SIPDispatchRuleInfo:
        require_sip(grants, "admin")
        if not req.sip_dispatch_rule_id:
            raise invalid("dispatch rule ID is required")
        info = _found(self.store.rule(req.sip_dispatch_rule_id), RULE_NOT_FOUND)
        self.store.delete_rule(req.sip_dispatch_rule_id)
        log.info("sip dispatch rule deleted", extra={"rule_id": req.sip_dispatch_rule_id})
        return info

    # -- calls -------------------------------------------------------------------------------

    async def create_participant(
        self, grants: Grants | None, req: sip.CreateSIPParticipantRequest
    ) -> sip.SIPParticipantInfo:
        require_sip(grants, "call")
        _check_dial(req)
        trunk = None
        if req.sip_trunk_id:
            trunk = _found(self.store.outbound_trunk(req.sip_trunk_id), TRUNK_NOT_FOUND)
        if self.calls is None:
            raise TwirpError("unavailable", "no SIP gateway is running on this server")
        return await self.calls.create_participant(req, trunk)

    async def transfer_participant(
        self, grants: Grants | None, req: sip.TransferSIPParticipantRequest
    ) -> sip.TransferSIPParticipantResponse:
        if not req.room_name:
            raise invalid("Missing room name")
        if not req.participant_identity:
            raise invalid("Missing participant identity")
        require_sip(grants, "call")
        if grants is None or not grants.has("roomAdmin") or grants.room != req.room_name:
            raise TwirpError("unauthenticated", PERMISSION_DENIED)
        _check_transfer(req)
        if self.calls is None:
            raise TwirpError("unavailable", "no SIP gateway is running on this server")
        return await self.calls.transfer_participant(req)


def _found(item: M | None, not_found: str) -> M:
    if item is None:
        raise TwirpError("not_found", not_found)
    return item


def _trunk_id(trunk_id: str) -> str:
    if not trunk_id:
        raise invalid("trunk ID is required")
    return trunk_id


def _check_update(item_id: str, action: str | None, what: str) -> str:
    if not item_id:
        raise invalid(f"{what} id must be set")
    if action is None:
        raise invalid("missing or unsupported update action")
    return action


def _field(msg: Message, name: str) -> Any:
    """A message field's value, or None when it is unset (Go's nil pointer)."""
    return getattr(msg, name) if msg.HasField(name) else None


def _check_inbound_update(update: sip.SIPInboundTrunkUpdate) -> None:
    for name in ("numbers", "allowed_addresses", "allowed_numbers"):
        validation.check_list_update(_field(update, name))
    validation.check_media(_field(update, "media"))


def _apply_scalars(info: Message, update: Message, names: Iterable[str]) -> None:
    for name in names:
        if update.HasField(name):
            setattr(info, name, getattr(update, name))


def _apply_media(
    info: sip.SIPInboundTrunkInfo | sip.SIPOutboundTrunkInfo | sip.SIPDispatchRuleInfo,
    update: sip.SIPInboundTrunkUpdate | sip.SIPOutboundTrunkUpdate | sip.SIPDispatchRuleUpdate,
) -> None:
    """livekit's updateMediaConfig: replace media, set the legacy encryption, upgrade, and
    copy the encryption back to the legacy field."""
    if update.HasField("media"):
        info.media.CopyFrom(update.media)
    if update.HasField("media_encryption"):
        info.media_encryption = update.media_encryption
    validation.upgrade_media(info)
    info.media_encryption = info.media.encryption


def _apply_inbound_update(info: sip.SIPInboundTrunkInfo, update: sip.SIPInboundTrunkUpdate) -> None:
    for name in ("numbers", "allowed_addresses", "allowed_numbers"):
        current = list(getattr(info, name))
        new = validation.apply_list_update(current, _field(update, name))
        info.ClearField(name)
        getattr(info, name).extend(new)
    _apply_scalars(
        info, update, ("auth_username", "auth_password", "auth_realm", "name", "metadata")
    )
    _apply_media(info, update)


def _apply_outbound_update(
    info: sip.SIPOutboundTrunkInfo, update: sip.SIPOutboundTrunkUpdate
) -> None:
    validation.check_list_update(_field(update, "numbers"))
    validation.check_media(_field(update, "media"))
    scalars = ("address", "transport", "destination_country", "auth_username", "auth_password")
    _apply_scalars(info, update, (*scalars, "name", "metadata", "from_host"))
    numbers = validation.apply_list_update(list(info.numbers), _field(update, "numbers"))
    info.ClearField("numbers")
    info.numbers.extend(numbers)
    _apply_media(info, update)


def _apply_rule_update(info: sip.SIPDispatchRuleInfo, update: sip.SIPDispatchRuleUpdate) -> None:
    trunk_ids = validation.apply_list_update(list(info.trunk_ids), _field(update, "trunk_ids"))
    info.ClearField("trunk_ids")
    info.trunk_ids.extend(trunk_ids)
    if update.HasField("rule"):
        info.rule.CopyFrom(update.rule)
    _apply_scalars(info, update, ("name", "metadata"))
    for key, value in update.attributes.items():
        if value:
            info.attributes[key] = value
        else:
            info.attributes.pop(key, None)
    _apply_media(info, update)


def _rule_info(req: sip.CreateSIPDispatchRuleRequest) -> sip.SIPDispatchRuleInfo:
    """The rule to store: `dispatch_rule` (upgraded), or the legacy top-level fields."""
    if req.HasField("dispatch_rule"):
        info = sip.SIPDispatchRuleInfo()
        info.CopyFrom(req.dispatch_rule)
        validation.upgrade_media(info)
        return info
    info = sip.SIPDispatchRuleInfo(
        trunk_ids=req.trunk_ids,
        inbound_numbers=req.inbound_numbers,
        hide_phone_number=req.hide_phone_number,
        name=req.name,
        metadata=req.metadata,
        attributes=req.attributes,
        room_preset=req.room_preset,
    )
    if req.HasField("rule"):
        info.rule.CopyFrom(req.rule)
    if req.HasField("room_config"):
        info.room_config.CopyFrom(req.room_config)
    return info


def _check_dial(req: sip.CreateSIPParticipantRequest) -> None:
    if not req.sip_trunk_id and not req.HasField("trunk") and not req.sip_number:
        raise invalid("missing sip trunk id and sip number")
    if req.HasField("trunk") and not req.trunk.hostname:
        raise invalid("no outbound hostname specified")
    if not req.sip_call_to:
        raise invalid("missing sip callee number")
    if "@" in req.sip_call_to:
        raise invalid("SipCallTo should be a phone number or SIP user, not a full SIP URI")
    if not req.room_name:
        raise invalid("missing room name")
    validation.check_headers(req.headers, {}, {})
    validation.check_media(req.media if req.HasField("media") else None)


def _check_transfer(req: sip.TransferSIPParticipantRequest) -> None:
    if not req.transfer_to:
        raise invalid("missing transfer to")
    inner = req.transfer_to
    if inner.startswith("<") and inner.endswith(">"):
        inner = inner[1:-1]
    if not inner.startswith(("sip:", "sips:", "tel:")):
        raise invalid("transfer_to must be a valid SIP(s) or TEL URI (sip:, sips: or tel:)")
    req.transfer_to = f"<{inner}>" if inner.startswith(("sip:", "sips:")) else inner
    validation.check_headers(req.headers, {}, {})
