"""The `livekit.SIP` API of `callboard server` against the real livekit-server (with Redis, where
it keeps trunks and rules): the same calls through the official livekit-api client on both, and
the same answers and refusals, ids aside."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from livekit import api
from livekit.protocol import models, room, sip

from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerProcess,
    ServerUnavailable,
    start_livekit_server_with_redis,
    start_server,
    stop_process,
)
from tests.server.sip.redis_server import RedisUnavailable, running_redis
from tests.twirp_http import PROTOBUF, twirp_request

SIP_URL = "/twirp/livekit.SIP/"
ID = re.compile(r"\b(ST|SDR)_[A-Za-z0-9]{12}\b")

Step = tuple[Any, ...]
WRAPPED_BY_LIVEKIT_SERVER = {"transfer without room", "transfer without identity"}
M = TypeVar("M", bound=Message)


@pytest.fixture(scope="module")
def both_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """callboard server and livekit-server (with its own Redis), each on a free loopback port."""
    logs = tmp_path_factory.mktemp("sip-api")
    try:
        with running_redis(logs / "redis") as redis_address:
            reference = start_livekit_server_with_redis(logs, redis_address)
            ours = start_server("callboard", logs)
            try:
                yield {"callboard": ours, "livekit-server": reference}
            finally:
                stop_process(ours.proc)
                stop_process(reference.proc)
    except (RedisUnavailable, ServerUnavailable) as e:
        pytest.skip(str(e))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Recorder:
    """Runs one step of the scenario and keeps its answer with ids replaced by their order."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.ids: dict[str, str] = {}

    def _names(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._names(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._names(v) for v in value]
        if isinstance(value, str):
            return ID.sub(self._name, value)
        return value

    def _name(self, found: re.Match[str]) -> str:
        return self.ids.setdefault(found[0], f"<{found[1]}#{len(self.ids)}>")

    async def __call__(self, name: str, call: Awaitable[Message]) -> Message | None:
        try:
            answer = await call
        except api.TwirpError as e:
            self.steps.append((name, "error", e.code, self._names(e.message)))
            return None
        as_dict = self._names(json_format.MessageToDict(answer, preserving_proto_field_name=True))
        if "items" in as_dict:
            # listed by id, and ids are random: compare the sets
            as_dict["items"].sort(key=lambda item: json.dumps(item, sort_keys=True))
        self.steps.append((name, "ok", as_dict))
        return answer


async def get_trunk(
    lk: api.LiveKitAPI, http_url: str, method: str, trunk_id: str, answer: type[M]
) -> M:
    """GetSIP{In,Out}boundTrunk, which livekit-api's SipService does not wrap: protobuf over
    plain HTTP, a Twirp error raised as livekit-api raises it."""
    body = sip.GetSIPInboundTrunkRequest(sip_trunk_id=trunk_id).SerializeToString()
    reply = await twirp_request(
        lk._session,
        http_url + SIP_URL + method,
        body,
        token=_token(admin=True),
        content_type=PROTOBUF,
    )
    if reply.status != 200:
        _, code, msg = reply.twirp_error()
        raise api.TwirpError(code, msg, status=reply.status)
    return answer.FromString(reply.body)


def _token(**sip_grants: bool) -> str:
    token = api.AccessToken(API_KEY, API_SECRET).with_ttl(datetime.timedelta(minutes=5))
    return (
        token.with_grants(api.VideoGrants()).with_sip_grants(api.SIPGrants(**sip_grants)).to_jwt()
    )


def _individual(prefix: str) -> sip.SIPDispatchRule:
    return sip.SIPDispatchRule(
        dispatch_rule_individual=sip.SIPDispatchRuleIndividual(room_prefix=prefix)
    )


async def _trunks(lk: api.LiveKitAPI, step: Recorder) -> tuple[str, str]:
    inbound = sip.SIPInboundTrunkInfo(
        name="acme",
        numbers=["+15550100"],
        allowed_addresses=["127.0.0.1/32"],
        auth_username="acme",
        auth_password="s3cret",
        headers_to_attributes={"X-Customer": "customer"},
    )
    created = await step(
        "create inbound",
        lk.sip.create_inbound_trunk(sip.CreateSIPInboundTrunkRequest(trunk=inbound)),
    )
    assert isinstance(created, sip.SIPInboundTrunkInfo)
    await step(
        "same number again",
        lk.sip.create_inbound_trunk(sip.CreateSIPInboundTrunkRequest(trunk=inbound)),
    )
    await step(
        "open trunk",
        lk.sip.create_inbound_trunk(
            sip.CreateSIPInboundTrunkRequest(trunk=sip.SIPInboundTrunkInfo(name="open"))
        ),
    )
    await step(
        "trunk with id",
        lk.sip.create_inbound_trunk(
            sip.CreateSIPInboundTrunkRequest(
                trunk=sip.SIPInboundTrunkInfo(sip_trunk_id="ST_x", numbers=["+1"])
            )
        ),
    )
    await step(
        "bad header",
        lk.sip.create_inbound_trunk(
            sip.CreateSIPInboundTrunkRequest(
                trunk=sip.SIPInboundTrunkInfo(numbers=["+2"], headers={"Call-ID": "x"})
            )
        ),
    )
    await step(
        "other caller, same number",
        lk.sip.create_inbound_trunk(
            sip.CreateSIPInboundTrunkRequest(
                trunk=sip.SIPInboundTrunkInfo(
                    numbers=["+1 (555) 0100"], allowed_numbers=["+15550111"]
                )
            )
        ),
    )
    outbound = sip.SIPOutboundTrunkInfo(
        name="out",
        address="127.0.0.1:5099",
        numbers=["+15550199"],
        auth_username="u",
        auth_password="p",
    )
    out = await step(
        "create outbound",
        lk.sip.create_outbound_trunk(sip.CreateSIPOutboundTrunkRequest(trunk=outbound)),
    )
    assert isinstance(out, sip.SIPOutboundTrunkInfo)
    await step(
        "outbound without numbers",
        lk.sip.create_outbound_trunk(
            sip.CreateSIPOutboundTrunkRequest(trunk=sip.SIPOutboundTrunkInfo(address="h"))
        ),
    )
    await step(
        "outbound to a URI",
        lk.sip.create_outbound_trunk(
            sip.CreateSIPOutboundTrunkRequest(
                trunk=sip.SIPOutboundTrunkInfo(address="sip:a@b", numbers=["+1"])
            )
        ),
    )
    await step(
        "outbound without address",
        lk.sip.create_outbound_trunk(
            sip.CreateSIPOutboundTrunkRequest(trunk=sip.SIPOutboundTrunkInfo(numbers=["+1"]))
        ),
    )
    return created.sip_trunk_id, out.sip_trunk_id


async def _trunk_reads_and_updates(
    lk: api.LiveKitAPI, step: Recorder, inbound: str, outbound: str
) -> None:
    await step("list inbound", lk.sip.list_inbound_trunk(sip.ListSIPInboundTrunkRequest()))
    await step(
        "list inbound by number",
        lk.sip.list_inbound_trunk(sip.ListSIPInboundTrunkRequest(numbers=["+15550100"])),
    )
    await step(
        "list inbound, other number",
        lk.sip.list_inbound_trunk(sip.ListSIPInboundTrunkRequest(numbers=["+19999"])),
    )
    await step(
        "list inbound by id",
        lk.sip.list_inbound_trunk(sip.ListSIPInboundTrunkRequest(trunk_ids=[inbound])),
    )
    await step(
        "list outbound, limit 1",
        lk.sip.list_outbound_trunk(
            sip.ListSIPOutboundTrunkRequest(page=models.Pagination(limit=1))
        ),
    )
    await step(
        "update inbound fields",
        lk.sip.update_inbound_trunk_fields(
            inbound, name="acme-2", numbers=models.ListUpdate(add=["+15550101"])
        ),
    )
    await step(
        "update inbound, bad list",
        lk.sip.update_inbound_trunk_fields(
            inbound, numbers=models.ListUpdate(clear=True, add=["+1"])
        ),
    )
    await step(
        "replace inbound",
        lk.sip.update_inbound_trunk(
            inbound,
            sip.SIPInboundTrunkInfo(
                numbers=["+15550100"], auth_username="acme", auth_password="n3w", name="replaced"
            ),
        ),
    )
    await step(
        "replace inbound, insecure",
        lk.sip.update_inbound_trunk(inbound, sip.SIPInboundTrunkInfo(name="open")),
    )
    await step("update missing inbound", lk.sip.update_inbound_trunk_fields("ST_missing", name="x"))
    await step(
        "update outbound fields",
        lk.sip.update_outbound_trunk_fields(
            outbound, address="127.0.0.1:5098", numbers=models.ListUpdate(set=["+15550198"])
        ),
    )
    await step(
        "replace outbound",
        lk.sip.update_outbound_trunk(
            outbound, sip.SIPOutboundTrunkInfo(address="127.0.0.1:5097", numbers=["+15550197"])
        ),
    )


async def _rules(lk: api.LiveKitAPI, step: Recorder, inbound: str) -> None:
    rule = sip.SIPDispatchRuleInfo(
        rule=_individual("call-"),
        trunk_ids=[inbound],
        name="individual",
        metadata='{"k": 1}',
        attributes={"team": "sales"},
        room_config=room.RoomConfiguration(
            agents=[api.RoomAgentDispatch(agent_name="assistant", metadata="m")]
        ),
    )
    created = await step(
        "create rule",
        lk.sip.create_dispatch_rule(sip.CreateSIPDispatchRuleRequest(dispatch_rule=rule)),
    )
    assert isinstance(created, sip.SIPDispatchRuleInfo)
    rule_id = created.sip_dispatch_rule_id
    await step(
        "same rule again",
        lk.sip.create_dispatch_rule(sip.CreateSIPDispatchRuleRequest(dispatch_rule=rule)),
    )
    await step(
        "rule without a rule",
        lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(dispatch_rule=sip.SIPDispatchRuleInfo(name="x"))
        ),
    )
    await step(
        "legacy rule fields",
        lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(
                rule=sip.SIPDispatchRule(
                    dispatch_rule_direct=sip.SIPDispatchRuleDirect(room_name="lobby", pin="1234")
                ),
                name="direct",
            )
        ),
    )
    await step(
        "callee rule",
        lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(
                dispatch_rule=sip.SIPDispatchRuleInfo(
                    rule=sip.SIPDispatchRule(
                        dispatch_rule_callee=sip.SIPDispatchRuleCallee(
                            room_prefix="to", randomize=True
                        )
                    ),
                    numbers=["+15550100"],
                )
            )
        ),
    )
    await step("list rules", lk.sip.list_dispatch_rule(sip.ListSIPDispatchRuleRequest()))
    await step(
        "list rules by trunk",
        lk.sip.list_dispatch_rule(sip.ListSIPDispatchRuleRequest(trunk_ids=[inbound])),
    )
    await step(
        "update rule fields",
        lk.sip.update_dispatch_rule_fields(
            rule_id, name="renamed", attributes={"team": "", "tier": "gold"}
        ),
    )
    await step(
        "replace rule",
        lk.sip.update_dispatch_rule(
            rule_id, sip.SIPDispatchRuleInfo(rule=_individual("phone-"), trunk_ids=[inbound])
        ),
    )
    await step(
        "delete rule",
        lk.sip.delete_dispatch_rule(sip.DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule_id)),
    )
    await step(
        "delete rule again",
        lk.sip.delete_dispatch_rule(sip.DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule_id)),
    )


async def _calls(lk: api.LiveKitAPI, step: Recorder) -> None:
    dial = lk.sip.create_sip_participant
    await step(
        "dial without trunk", dial(sip.CreateSIPParticipantRequest(sip_call_to="+1", room_name="r"))
    )
    await step(
        "dial without callee",
        dial(sip.CreateSIPParticipantRequest(sip_trunk_id="ST_x", room_name="r")),
    )
    await step(
        "dial a URI",
        dial(
            sip.CreateSIPParticipantRequest(sip_trunk_id="ST_x", sip_call_to="a@b", room_name="r")
        ),
    )
    await step(
        "dial without room",
        dial(sip.CreateSIPParticipantRequest(sip_trunk_id="ST_x", sip_call_to="+1")),
    )
    await step(
        "dial a missing trunk",
        dial(
            sip.CreateSIPParticipantRequest(
                sip_trunk_id="ST_missing", sip_call_to="+1", room_name="r"
            )
        ),
    )
    transfer = lk.sip.transfer_sip_participant
    await step(
        "transfer without room",
        transfer(
            sip.TransferSIPParticipantRequest(participant_identity="p", transfer_to="sip:a@b")
        ),
    )
    await step(
        "transfer without identity",
        transfer(sip.TransferSIPParticipantRequest(room_name="r", transfer_to="sip:a@b")),
    )


async def scenario(lk: api.LiveKitAPI, url: str) -> list[Step]:
    step = Recorder()
    inbound, outbound = await _trunks(lk, step)
    get_in, get_out = "GetSIPInboundTrunk", "GetSIPOutboundTrunk"
    in_answer, out_answer = sip.GetSIPInboundTrunkResponse, sip.GetSIPOutboundTrunkResponse
    await step("get inbound", get_trunk(lk, url, get_in, inbound, in_answer))
    await step("get missing inbound", get_trunk(lk, url, get_in, "ST_missing", in_answer))
    await step("get without id", get_trunk(lk, url, get_in, "", in_answer))
    await step("get outbound", get_trunk(lk, url, get_out, outbound, out_answer))
    await _trunk_reads_and_updates(lk, step, inbound, outbound)
    await _rules(lk, step, inbound)
    await _calls(lk, step)
    await step("delete trunk", lk.sip.delete_trunk(sip.DeleteSIPTrunkRequest(sip_trunk_id=inbound)))
    await step(
        "delete missing trunk",
        lk.sip.delete_trunk(sip.DeleteSIPTrunkRequest(sip_trunk_id="ST_missing")),
    )
    await step(
        "delete outbound", lk.sip.delete_trunk(sip.DeleteSIPTrunkRequest(sip_trunk_id=outbound))
    )
    await step("list after deletes", lk.sip.list_outbound_trunk(sip.ListSIPOutboundTrunkRequest()))
    return step.steps


async def grant_refusals(http_url: str, session: aiohttp.ClientSession) -> list[Step]:
    """What each method says to a token without the SIP grant it needs."""
    refusals = []
    cases = [
        ("ListSIPInboundTrunk", _token(call=True)),
        ("CreateSIPDispatchRule", _token()),
        ("CreateSIPParticipant", _token(admin=True)),
    ]
    for method, token in cases:
        reply = await twirp_request(session, http_url + SIP_URL + method, token=token)
        refusals.append((method, *reply.twirp_error()))
    return refusals


async def test_sip_api_answers_like_livekit_server(
    both_servers: dict[str, ServerProcess], session: aiohttp.ClientSession
) -> None:
    transcripts = {}
    for kind, srv in both_servers.items():
        async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
            steps = await scenario(lk, srv.http_url)
        transcripts[kind] = (steps, await grant_refusals(srv.http_url, session))
    ours, theirs = transcripts["callboard"], transcripts["livekit-server"]
    differences = [
        (mine, reference)
        for mine, reference in zip(ours[0], theirs[0], strict=True)
        if mine != reference
    ]
    for mine, reference in differences:
        print("callboard     ", mine, "\nlivekit-server", reference)
        # Pinned: livekit-server wraps these psrpc errors' text in "twirp error unknown: ";
        # ours says the reason alone, with the same code.
        assert mine[0] in WRAPPED_BY_LIVEKIT_SERVER
        assert reference == (*mine[:3], "twirp error unknown: " + mine[3])
    assert {mine[0] for mine, _ in differences} == WRAPPED_BY_LIVEKIT_SERVER
    assert ours[1] == theirs[1]
