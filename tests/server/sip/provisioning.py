"""A trunk for a called number and an individual dispatch rule (room prefix `call-`), through
the official livekit-api client: what the SIP tests, the end-to-end call and bench/sip.py need
before a phone can call in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from livekit import api
from livekit.protocol import room, sip

from callboard.server.config import DEV_API_KEY, DEV_API_SECRET

LOOPBACK = "127.0.0.1"


async def trunk_and_rule(
    http_url: str,
    called: str,
    *,
    auth: tuple[str, str] | None = None,
    rule: bool = True,
    attributes: Mapping[str, str] | None = None,
    agents: Sequence[str] = (),
    pin: str = "",
    departure_timeout: int = 0,
) -> tuple[str, str]:
    """(trunk id, rule id; "" without `rule`). Without `auth` the trunk admits 127.0.0.1;
    `agents` and `departure_timeout` (0: the server's default) go into the rule's room config."""
    async with api.LiveKitAPI(http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
        trunk = sip.SIPInboundTrunkInfo(name="acme", numbers=[called])
        if auth:
            trunk.auth_username, trunk.auth_password = auth
        else:
            trunk.allowed_addresses.append(LOOPBACK)
        created = await lk.sip.create_inbound_trunk(sip.CreateSIPInboundTrunkRequest(trunk=trunk))
        if not rule:
            return created.sip_trunk_id, ""
        info = sip.SIPDispatchRuleInfo(
            rule=sip.SIPDispatchRule(
                dispatch_rule_individual=sip.SIPDispatchRuleIndividual(room_prefix="call-", pin=pin)
            ),
            trunk_ids=[created.sip_trunk_id],
            attributes=dict(attributes or {}),
        )
        if agents or departure_timeout:
            dispatches = [api.RoomAgentDispatch(agent_name=name) for name in agents]
            config = room.RoomConfiguration(agents=dispatches, departure_timeout=departure_timeout)
            info.room_config.CopyFrom(config)
        made = await lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(dispatch_rule=info)
        )
        return created.sip_trunk_id, made.sip_dispatch_rule_id
