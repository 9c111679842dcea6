"""Phone calls into `callboard server`, with sipp as the phone on loopback and a server-side
member standing in for the agent: the SIP answers livekit-sip gives (pkg/sip/inbound.go), the
room the dispatch rule names, the caller's participant as the room sees it over the call, the
caller's audio and DTMF in the room, outbound dialing and transfer."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Final

import pytest
from livekit import api
from livekit.protocol import models, room, sip

from callboard.server.app import EmbeddedServer
from callboard.server.sip.inbound import PIN_LIMIT
from callboard.server.sip.phone import rms
from tests.conftest import API_KEY, API_SECRET
from tests.server.sip import sipp
from tests.server.sip.phone_media import RtpSink, RtpStream, write_pcap
from tests.server.sip.provisioning import trunk_and_rule
from tests.server.sip.room_agent import LIST_ROOMS, CallSeen, RoomAgent
from tests.server.support import wait_until

pytestmark = pytest.mark.skipif(sipp.shutil.which("sipp") is None, reason=sipp.SIPP_MISSING)
PROMPT_RMS: Final = 1000.0
PROMPT_FRAMES: Final = 10
"""200 ms of tone: the phone heard a prompt (the gateway sends silence otherwise)."""


async def provision(
    srv: EmbeddedServer, *, auth: tuple[str, str] | None = None, rule: bool = True
) -> tuple[str, str]:
    """An inbound trunk for the called number and an individual rule (prefix `call-`) with an
    agent and an attribute: (trunk id, rule id)."""
    return await trunk_and_rule(
        srv.http_url,
        sipp.CALLED,
        auth=auth,
        rule=rule,
        attributes={"team": "sales"},
        agents=["assistant"],
    )


def sip_port(srv: EmbeddedServer) -> int:
    assert srv.sip is not None
    return srv.sip.port


async def one_call(agent: RoomAgent) -> CallSeen:
    await wait_until(lambda: len(agent.calls) == 1, "the phone participant")
    [seen] = agent.calls.values()
    return seen


async def test_a_call_reaches_the_room_its_rule_names(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path
) -> None:
    """The seed's call: room `call-_<caller>_<12 random>`, participant `sip_<caller>` of kind
    SIP with livekit-sip's attributes, ringing → active → hangup, the caller's audio and
    DTMF in the room, and a CLIENT_INITIATED leave on BYE."""
    trunk_id, rule_id = await provision(gateway)
    wav = sipp.write_ulaw_wav(tmp_path / "hello.wav", sipp.tone(1.0))
    scenario = sipp.answered_call(audio=str(wav), dtmf="12#", talk_ms=2500)
    run = await sipp.run_sipp(tmp_path, scenario, sip_port(gateway))
    assert run.returncode == 0, run.output + run.errors
    seen = await one_call(agent)
    await wait_until(lambda: seen.left, "the caller's leave")
    assert re.fullmatch(r"call-_\+56975231235_[2-9A-HJ-NP-Za-km-z]{12}", seen.room)
    info = seen.info
    assert (info.identity, info.name) == ("sip_+56975231235", "Phone +56975231235")
    assert info.kind == models.ParticipantInfo.SIP
    attributes = dict(info.attributes)
    assert re.fullmatch(r"SCL_\w{12}", attributes.pop("sip.callID"))
    assert re.fullmatch(r"\d+SIPpTag\d+", attributes.pop("sip.callTag"))
    assert re.fullmatch(r"1-\d+@127\.0\.0\.1", attributes.pop("sip.callIDFull"))
    assert attributes == {
        "team": "sales",
        "sip.trunkID": trunk_id,
        "sip.ruleID": rule_id,
        "sip.phoneNumber": sipp.CALLER,
        "sip.hostname": "127.0.0.1",
        "sip.trunkPhoneNumber": sipp.CALLED,
        "sip.callStatus": "hangup",
    }
    assert seen.statuses == ["ringing", "active", "hangup"]
    assert info.disconnect_reason == models.DisconnectReason.CLIENT_INITIATED
    heard = len(seen.audio) / 48000
    assert heard >= 0.8, f"about a second of the caller's tone reached the room ({heard:.2f} s)"
    assert seen.digits == ["1", "2", "#"]


async def test_the_call_rings_until_someone_subscribes(
    gateway: EmbeddedServer, tmp_path: Path
) -> None:
    """livekit-sip waitSubscribe: with nobody in the room the call keeps ringing; the caller's
    CANCEL ends it with 487 Request Terminated and the participant leaves."""
    await provision(gateway)
    steps = sipp.invite() + '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="180"/>\n  <pause milliseconds="1000"/>\n'
    steps += sipp.cancel() + '  <recv response="200"/>\n  <recv response="487"/>\n'
    steps += sipp.ack_for_error()
    run = await sipp.run_sipp(tmp_path, sipp.scenario("cancelled", steps), sip_port(gateway))
    assert run.returncode == 0, run.output + run.errors
    listed = await gateway.rooms.list_rooms(LIST_ROOMS, room.ListRoomsRequest())
    [called] = listed.rooms
    assert gateway.rooms.live_room(called.name).participants == {}


async def test_digest_auth_challenges_then_accepts(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path
) -> None:
    """inbound.go handleInviteAuth: no credentials → 407 with Proxy-Authenticate; the answer
    with the trunk's username and password → the call goes through."""
    await provision(gateway, auth=("acme", "s3cret"))
    scenario = sipp.answered_call(auth=True, talk_ms=200)
    run = await sipp.run_sipp(tmp_path, scenario, sip_port(gateway), auth=("acme", "s3cret"))
    assert run.returncode == 0, run.output + run.errors
    seen = await one_call(agent)
    await wait_until(lambda: seen.left, "the caller's leave")
    assert seen.statuses == ["ringing", "active", "hangup"]


async def test_wrong_password_is_refused(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """inbound.go handleInviteAuth: a digest that does not match → 401 Unauthorized; no room;
    neither password appears in the logs."""
    await provision(gateway, auth=("acme", "s3cret"))
    steps = sipp.invite() + '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="407" auth="true"/>\n' + sipp.ack_for_error()
    steps += sipp.invite(extra="[authentication]") + '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="401"/>\n' + sipp.ack_for_error()
    scenario = sipp.scenario("wrong password", steps)
    run = await sipp.run_sipp(tmp_path, scenario, sip_port(gateway), auth=("acme", "guess"))
    assert run.returncode == 0, run.output + run.errors
    assert agent.calls == {} and agent.members == {}
    assert "s3cret" not in caplog.text and "guess" not in caplog.text


@pytest.mark.parametrize(
    ("trunk", "rule", "status"),
    [
        pytest.param(False, False, 404, id="no trunk: 404 Does not match any SIP Trunks"),
        pytest.param(True, False, 404, id="no rule: 404 Does not match Trunks or Dispatch Rules"),
    ],
)
async def test_unmatched_calls_are_refused(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path, trunk: bool, rule: bool, status: int
) -> None:
    if trunk:
        await provision(gateway, rule=rule)
    run = await sipp.run_sipp(tmp_path, sipp.refused_call(status), sip_port(gateway))
    assert run.returncode == 0, run.output + run.errors
    assert agent.calls == {}


async def test_a_call_over_tcp(gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path) -> None:
    await provision(gateway)
    scenario = sipp.answered_call(talk_ms=200)
    run = await sipp.run_sipp(tmp_path, scenario, sip_port(gateway), transport="t1")
    assert run.returncode == 0, run.output + run.errors
    seen = await one_call(agent)
    await wait_until(lambda: seen.left, "the caller's leave")
    assert seen.info.disconnect_reason == models.DisconnectReason.CLIENT_INITIATED


PIN: Final = "1234"
TOO_LONG: Final = "1" * (PIN_LIMIT + 1)


@pytest.mark.parametrize(
    ("typed", "admitted"),
    [
        pytest.param(PIN + "#", True, id="inbound.go pinPrompt: the right pin, then #, joins"),
        pytest.param("9999#", False, id="inbound.go pinPrompt: a wrong pin is hung up on"),
        pytest.param(TOO_LONG, False, id="inbound.go pinPrompt: past pinLimit (16) is wrong"),
    ],
)
async def test_a_pin_protected_rule(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path, typed: str, admitted: bool
) -> None:
    """inbound.go handleInvite with DispatchRequestPin: the call is answered at once (nobody
    is in a room yet), the caller hears the enter-pin prompt and types digits (RFC 4733, sipp
    replaying a pcap); the right pin joins the rule's room as `active` (no ringing) and the
    digits never reach the room; a wrong one hears the wrong-pin prompt and gets a BYE."""
    if os.geteuid() != 0:
        pytest.skip("sipp's play_pcap_audio sends from a raw socket: run as root")
    await trunk_and_rule(gateway.http_url, sipp.CALLED, pin=PIN)
    digits = RtpStream().silence(0.2).digits(typed).silence(0.3).take()
    pcap = write_pcap(tmp_path / "pin.pcap", digits)
    sink, media_port = await RtpSink.open(sipp.HOST)
    try:
        scenario = sipp.pin_call(media_port, pcap, admitted)
        run = await sipp.run_sipp(tmp_path, scenario, sip_port(gateway))
    finally:
        sink.close()
    assert run.returncode == 0, run.output + run.errors
    assert sum(rms(frame) > PROMPT_RMS for frame in sink.heard) >= PROMPT_FRAMES, "a prompt"
    if not admitted:
        assert agent.calls == {}
        return
    seen = await one_call(agent)
    await wait_until(lambda: seen.left, "the caller's leave")
    assert re.fullmatch(r"call-_\+56975231235_\w{12}", seen.room)
    assert seen.statuses == ["active", "hangup"]
    assert seen.digits == []


async def test_a_caller_who_hangs_up_at_the_pin_prompt_joins_no_room(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path
) -> None:
    """inbound.go pinPrompt: a BYE while the PIN is awaited ends the call (200 OK to it)."""
    await trunk_and_rule(gateway.http_url, sipp.CALLED, pin=PIN)
    run = await sipp.run_sipp(tmp_path, sipp.answered_call(talk_ms=300), sip_port(gateway))
    assert run.returncode == 0, run.output + run.errors
    await asyncio.sleep(0.3)
    assert agent.calls == {}
    assert gateway.sip is not None and gateway.sip.calls == {}


async def outbound_trunk(
    srv: EmbeddedServer, port: int, transport: sip.SIPTransport.ValueType = sip.SIP_TRANSPORT_AUTO
) -> str:
    async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
        trunk = await lk.sip.create_outbound_trunk(
            sip.CreateSIPOutboundTrunkRequest(
                trunk=sip.SIPOutboundTrunkInfo(
                    name="out",
                    address=f"127.0.0.1:{port}",
                    numbers=["+15550199"],
                    transport=transport,
                )
            )
        )
        return trunk.sip_trunk_id


@pytest.mark.parametrize(
    ("transport", "sipp_transport"),
    [
        pytest.param(sip.SIP_TRANSPORT_AUTO, "u1", id="UDP"),
        pytest.param(sip.SIP_TRANSPORT_TCP, "t1", id="TCP: the trunk's transport"),
    ],
)
async def test_create_sip_participant_dials_a_phone_that_answers(
    gateway: EmbeddedServer,
    agent: RoomAgent,
    tmp_path: Path,
    transport: sip.SIPTransport.ValueType,
    sipp_transport: str,
) -> None:
    """CreateSIPParticipant through a stored outbound trunk to sipp answering as a phone: the
    callee joins the room as dialing, goes active on 200 OK, and hangs up (BYE) after a
    second. The phone rings for half a second first, as phones do: answered at once on
    loopback, the callee could be active before the test's agent (which looks for phones in
    rooms every 10 ms) has joined to see it dialing."""
    phone_port = sipp.free_port()
    trunk_id = await outbound_trunk(gateway, phone_port, transport)
    scenario = sipp.answering_phone(1000, ring_ms=500)
    phone = asyncio.create_task(
        sipp.run_sipp(tmp_path, scenario, None, listen_port=phone_port, transport=sipp_transport)
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
    seen = await one_call(agent)
    await wait_until(lambda: seen.left, "the callee's BYE")
    assert seen.statuses == ["dialing", "active", "hangup"]
    assert seen.info.attributes["sip.phoneNumber"] == "+15550123"
    assert seen.info.attributes["sip.trunkID"] == trunk_id
    assert seen.info.disconnect_reason == models.DisconnectReason.CLIENT_INITIATED


async def test_dialing_a_tcp_trunk_nobody_listens_on_is_unavailable(
    gateway: EmbeddedServer, agent: RoomAgent
) -> None:
    trunk_id = await outbound_trunk(gateway, sipp.free_port(), sip.SIP_TRANSPORT_TCP)
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        with pytest.raises(api.TwirpError) as refused:
            await lk.sip.create_sip_participant(
                sip.CreateSIPParticipantRequest(
                    sip_trunk_id=trunk_id, sip_call_to="+15550123", room_name="support"
                )
            )
    assert refused.value.code == "unavailable" and "over TCP" in refused.value.message
    assert agent.calls == {}


async def test_dialing_without_a_stored_trunk_is_refused(
    gateway: EmbeddedServer, agent: RoomAgent
) -> None:
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
    assert agent.calls == {}


async def test_transfer_refers_the_caller_and_hangs_up(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path
) -> None:
    await provision(gateway)
    caller = asyncio.create_task(
        sipp.run_sipp(tmp_path, sipp.transferred_call(), sip_port(gateway))
    )
    seen = await one_call(agent)
    await wait_until(lambda: "active" in seen.statuses, "the answer")
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        result = await lk.sip.transfer_sip_participant(
            sip.TransferSIPParticipantRequest(
                room_name=seen.room, participant_identity=seen.identity, transfer_to="tel:+15550777"
            )
        )
    assert result.status == sip.STS_TRANSFER_SUCCESSFUL
    run = await caller
    assert run.returncode == 0, run.output + run.errors
    await wait_until(lambda: seen.left, "the caller's leave")
    assert seen.statuses[-1] == "hangup"
