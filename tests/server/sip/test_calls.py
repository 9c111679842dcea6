"""Phone calls into `callboard server`, with sipp as the phone on loopback: the SIP answers
livekit-sip gives (pkg/sip/inbound.go), the room the dispatch rule names, the caller's
participant state over the call, RTP and DTMF from the phone."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from livekit import api
from livekit.protocol import models, room, sip

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.server.sip.room_leg import DispatchLeg, DispatchRooms
from tests.conftest import API_KEY, API_SECRET
from tests.server.sip import sipp
from tests.server.support import wait_until

pytestmark = pytest.mark.skipif(sipp.shutil.which("sipp") is None, reason=sipp.SIPP_MISSING)


@pytest.fixture
async def gateway() -> AsyncIterator[EmbeddedServer]:
    """The embedded server with its SIP gateway on a free loopback port."""
    async with run_server(ServerConfig(port=0, sip_port=0)) as srv:
        yield srv


async def provision(
    srv: EmbeddedServer, *, auth: tuple[str, str] | None = None, rule: bool = True
) -> tuple[str, str]:
    """An inbound trunk for the called number and an individual rule (prefix `call-`) with an
    agent, through the official client: (trunk id, rule id)."""
    async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
        trunk = sip.SIPInboundTrunkInfo(name="acme", numbers=[sipp.CALLED])
        if auth:
            trunk.auth_username, trunk.auth_password = auth
        else:
            trunk.allowed_addresses.append("127.0.0.1")
        created = await lk.sip.create_inbound_trunk(sip.CreateSIPInboundTrunkRequest(trunk=trunk))
        if not rule:
            return created.sip_trunk_id, ""
        info = sip.SIPDispatchRuleInfo(
            rule=sip.SIPDispatchRule(
                dispatch_rule_individual=sip.SIPDispatchRuleIndividual(room_prefix="call-")
            ),
            trunk_ids=[created.sip_trunk_id],
            attributes={"team": "sales"},
            room_config=room.RoomConfiguration(
                agents=[api.RoomAgentDispatch(agent_name="assistant")]
            ),
        )
        made = await lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(dispatch_rule=info)
        )
        return created.sip_trunk_id, made.sip_dispatch_rule_id


def legs(srv: EmbeddedServer) -> list[DispatchLeg]:
    assert srv.sip is not None and isinstance(srv.sip.rooms, DispatchRooms)
    return srv.sip.rooms.legs


async def test_a_call_reaches_the_room_its_rule_names(
    gateway: EmbeddedServer, tmp_path: Path
) -> None:
    trunk_id, rule_id = await provision(gateway)
    wav = sipp.write_ulaw_wav(tmp_path / "hello.wav", sipp.tone(1.0))
    assert gateway.sip is not None
    run = await sipp.run_sipp(
        tmp_path, sipp.answered_call(audio=str(wav), dtmf="12#", talk_ms=2500), gateway.sip.port
    )
    assert run.returncode == 0, run.output + run.errors
    [leg] = legs(gateway)
    assert re.fullmatch(r"call-_\+56975231235_[2-9A-HJ-NP-Za-km-z]{12}", leg.room_name)
    assert leg.identity == "sip_+56975231235"
    attributes = dict(leg.attributes)
    assert re.fullmatch(r"SCL_\w{12}", attributes.pop("sip.callID"))
    assert attributes == {
        "team": "sales",
        "sip.trunkID": trunk_id,
        "sip.ruleID": rule_id,
        "sip.phoneNumber": sipp.CALLER,
        "sip.hostname": "127.0.0.1",
        "sip.trunkPhoneNumber": sipp.CALLED,
        "sip.callStatus": "hangup",
    }
    assert leg.left == models.DisconnectReason.CLIENT_INITIATED
    assert leg.frames >= 40, "about a second of the caller's audio reached the room"
    assert leg.digits == ["1", "2", "#"]


async def test_digest_auth_challenges_then_accepts(gateway: EmbeddedServer, tmp_path: Path) -> None:
    """inbound.go handleInviteAuth: no credentials → 407 with Proxy-Authenticate; the answer
    with the trunk's username and password → the call goes through."""
    await provision(gateway, auth=("acme", "s3cret"))
    assert gateway.sip is not None
    run = await sipp.run_sipp(
        tmp_path,
        sipp.answered_call(auth=True, talk_ms=200),
        gateway.sip.port,
        auth=("acme", "s3cret"),
    )
    assert run.returncode == 0, run.output + run.errors
    [leg] = legs(gateway)
    assert leg.attributes["sip.callStatus"] == "hangup"


async def test_wrong_password_is_refused(
    gateway: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """inbound.go handleInviteAuth: a digest that does not match → 401 Unauthorized; no room;
    neither password appears in the logs."""
    await provision(gateway, auth=("acme", "s3cret"))
    assert gateway.sip is not None
    steps = sipp.invite() + '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="407" auth="true"/>\n' + sipp.ack_for_error()
    steps += sipp.invite(extra="[authentication]") + '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="401"/>\n' + sipp.ack_for_error()
    run = await sipp.run_sipp(
        tmp_path,
        sipp.scenario("wrong password", steps),
        gateway.sip.port,
        auth=("acme", "guess"),
    )
    assert run.returncode == 0, run.output + run.errors
    assert legs(gateway) == []
    assert "s3cret" not in caplog.text and "guess" not in caplog.text


@pytest.mark.parametrize(
    ("trunk", "rule", "status"),
    [
        pytest.param(False, False, 404, id="no trunk: 404 Does not match any SIP Trunks"),
        pytest.param(True, False, 404, id="no rule: 404 Does not match Trunks or Dispatch Rules"),
    ],
)
async def test_unmatched_calls_are_refused(
    gateway: EmbeddedServer, tmp_path: Path, trunk: bool, rule: bool, status: int
) -> None:
    if trunk:
        await provision(gateway, rule=rule)
    assert gateway.sip is not None
    run = await sipp.run_sipp(tmp_path, sipp.refused_call(status), gateway.sip.port)
    assert run.returncode == 0, run.output + run.errors
    assert legs(gateway) == []


async def test_a_call_over_tcp(gateway: EmbeddedServer, tmp_path: Path) -> None:
    await provision(gateway)
    assert gateway.sip is not None
    run = await sipp.run_sipp(
        tmp_path, sipp.answered_call(talk_ms=200), gateway.sip.port, transport="t1"
    )
    assert run.returncode == 0, run.output + run.errors
    assert legs(gateway)[0].left == models.DisconnectReason.CLIENT_INITIATED


async def outbound_trunk(srv: EmbeddedServer, port: int) -> str:
    async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
        trunk = await lk.sip.create_outbound_trunk(
            sip.CreateSIPOutboundTrunkRequest(
                trunk=sip.SIPOutboundTrunkInfo(
                    name="out", address=f"127.0.0.1:{port}", numbers=["+15550199"]
                )
            )
        )
        return trunk.sip_trunk_id


async def test_create_sip_participant_dials_a_phone_that_answers(
    gateway: EmbeddedServer, tmp_path: Path
) -> None:
    """CreateSIPParticipant through a stored outbound trunk to sipp answering as a phone: the
    callee joins the room as dialing, goes active on 200 OK, and hangs up (BYE) after a
    second; RTP flowed both ways."""
    phone_port = sipp.free_port()
    trunk_id = await outbound_trunk(gateway, phone_port)
    phone = asyncio.create_task(
        sipp.run_sipp(tmp_path, sipp.answering_phone(1000), None, listen_port=phone_port)
    )
    await asyncio.sleep(0.5)  # sipp is listening
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        info = await lk.sip.create_sip_participant(
            sip.CreateSIPParticipantRequest(
                sip_trunk_id=trunk_id,
                sip_call_to="+15550123",
                room_name="support",
                participant_identity="callee",
                wait_until_answered=True,
            )
        )
    assert (info.participant_identity, info.room_name) == ("callee", "support")
    assert re.fullmatch(r"SCL_\w{12}", info.sip_call_id)
    run = await phone
    assert run.returncode == 0, run.output + run.errors
    [leg] = legs(gateway)
    await wait_until(lambda: leg.left is not None, "the callee's BYE")
    assert leg.statuses == ["dialing", "active", "hangup"]
    assert leg.attributes["sip.phoneNumber"] == "+15550123"
    assert leg.attributes["sip.trunkID"] == trunk_id
    assert leg.left == models.DisconnectReason.CLIENT_INITIATED


async def test_dialing_without_a_stored_trunk_is_refused(gateway: EmbeddedServer) -> None:
    """No open relay: a caller with the sip.call grant still cannot name an arbitrary host."""
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        with pytest.raises(api.TwirpError) as refused:
            await lk.sip.create_sip_participant(
                sip.CreateSIPParticipantRequest(
                    trunk=sip.SIPOutboundConfig(hostname="198.51.100.7"),
                    sip_call_to="+15550123",
                    room_name="support",
                )
            )
    assert refused.value.code == "failed_precondition"
    assert legs(gateway) == []


async def test_transfer_refers_the_caller_and_hangs_up(
    gateway: EmbeddedServer, tmp_path: Path
) -> None:
    await provision(gateway)
    assert gateway.sip is not None
    caller = asyncio.create_task(sipp.run_sipp(tmp_path, sipp.transferred_call(), gateway.sip.port))
    await wait_until(
        lambda: bool(legs(gateway)) and "active" in legs(gateway)[0].statuses, "answer"
    )
    [leg] = legs(gateway)
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        result = await lk.sip.transfer_sip_participant(
            sip.TransferSIPParticipantRequest(
                room_name=leg.room_name,
                participant_identity=leg.identity,
                transfer_to="tel:+15550777",
            )
        )
    assert result.status == sip.STS_TRANSFER_SUCCESSFUL
    run = await caller
    assert run.returncode == 0, run.output + run.errors
    assert leg.statuses[-1] == "hangup"
