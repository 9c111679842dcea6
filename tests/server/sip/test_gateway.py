"""The gateway's SIP answers, request by request over loopback UDP (livekit-sip
pkg/sip/inbound.go for the statuses and reasons), and its behaviour under a flood."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import pytest
from livekit import api
from livekit.protocol import sip

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.server.sip.message import SipMessage, parse, reply
from tests.conftest import API_KEY, API_SECRET
from tests.server.sip.phone_media import RtpSink
from tests.server.sip.raw_sip import HOST, OFFER, RawSipClient, request
from tests.server.sip.room_agent import RoomAgent
from tests.server.sip.test_calls import one_call, provision


@pytest.fixture
async def phone(gateway: EmbeddedServer) -> AsyncIterator[RawSipClient]:
    assert gateway.sip is not None
    client = await RawSipClient.open(gateway.sip.port)
    yield client
    client.close()


def port_of(srv: EmbeddedServer) -> int:
    assert srv.sip is not None
    return srv.sip.port


async def test_options_is_answered_with_what_we_allow(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    [ok] = await phone.request(request("OPTIONS", port_of(gateway)))
    assert (ok.status, ok.reason) == (200, "OK")
    assert "INVITE" in ok.get("Allow") and "BYE" in ok.get("Allow")


async def test_an_unknown_method_is_405(gateway: EmbeddedServer, phone: RawSipClient) -> None:
    [refused] = await phone.request(request("SUBSCRIBE", port_of(gateway)))
    assert refused.status == 405 and refused.get("Allow")


async def test_an_invite_without_a_trunk_is_404(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    """livekit-sip's AuthNotFound answer. (livekit-server's own IOInfo service answers no trunk
    with an empty auth result instead; a call then needs a wildcard rule: callboard requires a
    trunk for every call.)"""
    *provisional, final = await phone.request(request("INVITE", port_of(gateway), body=OFFER))
    assert [p.status for p in provisional] == [100]
    assert (final.status, final.reason) == (404, "Does not match any SIP Trunks")
    assert final.to.tag, "a final response carries our To tag"


async def test_an_invite_without_a_rule_is_404(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    """inbound.go DispatchNoRuleReject: 180 first (rules are evaluated while ringing), then
    404 "Does not match Trunks or Dispatch Rules"."""
    await provision(gateway, rule=False)
    *provisional, final = await phone.request(request("INVITE", port_of(gateway), body=OFFER))
    assert [p.status for p in provisional] == [100, 180]
    assert (final.status, final.reason) == (404, "Does not match Trunks or Dispatch Rules")


async def test_a_retransmitted_invite_gets_the_same_answer(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    invite = request("INVITE", port_of(gateway), body=OFFER)
    first = await phone.request(invite)
    again = await phone.request(invite)
    assert [m.status for m in again] == [first[-1].status]
    assert again[0].to.tag == first[-1].to.tag


async def test_a_final_error_is_retransmitted_until_acked(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    """RFC 3261 §17.2.1: over UDP the 404 repeats (T1, 2·T1, ...) while no ACK comes."""
    await phone.request(request("INVITE", port_of(gateway), body=OFFER))
    repeats = await phone.responses(timeout=3.0)  # the first repeat is due 0.5 s after
    assert [m.status for m in repeats] == [404]


async def test_offers_without_a_common_codec_are_488(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    await provision(gateway)
    offer = OFFER.replace(b"RTP/AVP 0 101", b"RTP/AVP 18").replace(b"a=rtpmap:0 PCMU", b"a=x:0")
    *_, final = await phone.request(request("INVITE", port_of(gateway), body=offer))
    assert final.status == 488


async def test_required_extensions_we_lack_are_420(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    """Extensions we do not have (preconditions, RFC 3312) are refused cleanly (RFC 3261
    §8.2.2.3)."""
    invite = request("INVITE", port_of(gateway), body=OFFER, extra="Require: precondition")
    [refused] = await phone.request(invite)
    assert refused.status == 420 and refused.get("Unsupported") == "precondition"


def short_sessions(srv: EmbeddedServer, min_se: int = 2) -> None:
    """Min-SE of a couple of seconds, so that a test sees refreshes (the RFC's is 90 s)."""
    assert srv.sip is not None
    srv.sip.config = dataclasses.replace(srv.sip.config, min_session_expires=min_se)


async def test_a_session_interval_below_min_se_is_422(
    gateway: EmbeddedServer, phone: RawSipClient
) -> None:
    """RFC 4028 §9: 422 Session Interval Too Small, with our Min-SE."""
    extra = "Supported: timer\r\nSession-Expires: 30"
    *_, refused = await phone.request(request("INVITE", port_of(gateway), body=OFFER, extra=extra))
    assert (refused.status, refused.get("Min-SE")) == (422, "90")


async def test_we_refresh_a_session_when_the_caller_asks_us_to(
    gateway: EmbeddedServer, agent: RoomAgent, phone: RawSipClient
) -> None:
    """RFC 4028 §7.4 and §9: `refresher=uas` → the 200 OK requires timer and names us; half
    way through the interval we send a re-INVITE with our SDP, and ACK its 200 OK."""
    short_sessions(gateway)
    await provision(gateway)
    extra = "Supported: timer\r\nSession-Expires: 2;refresher=uas"
    invite = request("INVITE", port_of(gateway), body=OFFER, extra=extra)
    *_, ok = await phone.request(invite)
    assert ok.status == 200
    assert (ok.get("Session-Expires"), ok.get("Require")) == ("2;refresher=uas", "timer")
    phone.send(ack(invite, ok, 1))
    refresh = await phone.next_request("INVITE", 3.0)
    assert refresh is not None and refresh.call_id == parse(invite).call_id
    assert refresh.get("Session-Expires") == "2;refresher=uas" and b"m=audio" in refresh.body
    answer = reply(refresh, 200)
    answer.add("Content-Type", "application/sdp")
    answer.body = OFFER
    phone.send(answer.encode())
    acked = await phone.next_request("ACK", 2.0)
    assert acked is not None and acked.get("CSeq") == refresh.get("CSeq").replace("INVITE", "ACK")


async def test_a_session_the_caller_stops_refreshing_is_ended(
    gateway: EmbeddedServer, agent: RoomAgent, phone: RawSipClient
) -> None:
    """RFC 4028 §10 with `refresher=uac`: a refresh (here an UPDATE, RFC 3311) is answered
    with the session's terms; without one for an interval (less a third) we send BYE."""
    short_sessions(gateway, 3)
    await provision(gateway)
    extra = "Supported: timer\r\nSession-Expires: 3;refresher=uac"
    invite = request("INVITE", port_of(gateway), body=OFFER, extra=extra)
    *_, ok = await phone.request(invite)
    assert ok.get("Session-Expires") == "3;refresher=uac"
    phone.send(ack(invite, ok, 1))
    await asyncio.sleep(1.0)
    update = reinvite(invite, ok, 2, b"").replace(b"INVITE", b"UPDATE")
    [refreshed] = await phone.request(update)
    assert (refreshed.status, refreshed.get("Session-Expires")) == (200, "3;refresher=uac")
    assert await phone.next_request("BYE", 1.5) is None, "refreshed: not over yet"
    bye = await phone.next_request("BYE", 2.0)
    assert bye is not None and "session expired" in bye.get("Reason")
    phone.send(reply(bye, 200).encode())


async def test_bye_for_no_call_is_481(gateway: EmbeddedServer, phone: RawSipClient) -> None:
    [refused] = await phone.request(request("BYE", port_of(gateway)))
    assert refused.status == 481


def reinvite(invite: bytes, ok: SipMessage, cseq: int, offer: bytes) -> bytes:
    """`invite` again inside its dialog (our To tag), with a new CSeq, branch and offer."""
    head, _, _ = invite.partition(b"\r\n\r\n")
    head = (
        head.replace(b"CSeq: 1 INVITE", f"CSeq: {cseq} INVITE".encode())
        .replace(b"To: <sip:+15550100@127.0.0.1>", f"To: {ok.get('To')}".encode())
        .replace(b"branch=z9hG4bK", f"branch=z9hG4bK{cseq}x".encode())
    )
    head = re.sub(rb"Content-Length: \d+", f"Content-Length: {len(offer)}".encode(), head)
    return head + b"\r\n\r\n" + offer


def ack(invite: bytes, ok: SipMessage, cseq: int) -> bytes:
    """The ACK for the 200 OK to the INVITE with CSeq `cseq`."""
    return reinvite(invite, ok, cseq, b"").replace(b"INVITE", b"ACK")


def offer_to(port: int, direction: str = "sendrecv") -> bytes:
    return OFFER.replace(b"m=audio 40000", f"m=audio {port}".encode()) + (
        f"a={direction}\r\n".encode()
    )


async def packets_within(sink: RtpSink, seconds: float) -> int:
    before = len(sink.heard)
    await asyncio.sleep(seconds)
    return len(sink.heard) - before


async def test_hold_stops_our_media_and_resume_follows_the_new_address(
    gateway: EmbeddedServer, agent: RoomAgent, phone: RawSipClient
) -> None:
    """RFC 3264 §8.4: a re-INVITE offering sendonly is answered recvonly and we send nothing
    while held; livekit-sip inbound.go updateRemoteFromSDP: the re-INVITE that resumes may
    name another RTP address, and our audio goes there."""
    await provision(gateway)
    first, first_port = await RtpSink.open(HOST)
    second, second_port = await RtpSink.open(HOST)
    try:
        invite = request("INVITE", port_of(gateway), body=offer_to(first_port))
        *_, ok = await phone.request(invite)
        assert ok.status == 200 and b"a=sendrecv" in ok.body
        phone.send(ack(invite, ok, 1))
        assert await packets_within(first, 0.3) >= 10, "20 ms frames while active"
        [held] = await phone.request(reinvite(invite, ok, 2, offer_to(first_port, "sendonly")))
        assert held.status == 200 and b"a=recvonly" in held.body
        phone.send(ack(invite, ok, 2))
        await asyncio.sleep(0.1)  # a frame already on its way
        assert await packets_within(first, 0.4) == 0, "nothing sent while on hold"
        [resumed] = await phone.request(reinvite(invite, ok, 3, offer_to(second_port)))
        assert resumed.status == 200 and b"a=sendrecv" in resumed.body
        phone.send(ack(invite, ok, 3))
        assert await packets_within(second, 0.3) >= 10, "resumed, to the new address"
        assert await packets_within(first, 0.2) == 0
    finally:
        first.close()
        second.close()


async def test_an_invite_flood_is_shed_with_503_and_calls_go_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """500 INVITEs at once (bounded: one burst) against a gateway allowing 20 a second: each
    gets a final answer (404 or 503 Try again later), and the gateway still answers after."""
    async with run_server(ServerConfig(port=0, sip_port=0)) as srv:
        assert srv.sip is not None
        srv.sip._invites.rate = 20
        srv.sip._invites._tokens = 20
        phone = await RawSipClient.open(srv.sip.port)
        try:
            for _ in range(500):
                phone.send(request("INVITE", srv.sip.port, body=OFFER))
            finals: dict[int, int] = {}
            while sum(finals.values()) < 500:
                got = await phone.responses(timeout=3.0)
                if not got:
                    break
                final = got[-1].status
                if final >= 200:
                    finals[final] = finals.get(final, 0) + 1
            assert finals.get(503, 0) >= 400 and set(finals) <= {404, 503}
            await asyncio.sleep(1.0)
            [ok] = await phone.request(request("OPTIONS", srv.sip.port))
            assert ok.status == 200
        finally:
            phone.close()


async def test_invite_headers_become_attributes(
    gateway: EmbeddedServer, agent: RoomAgent, phone: RawSipClient
) -> None:
    """livekit-sip HeadersToAttrs: with include_headers X- headers, each X- header is
    `sip.h.<name>`; provider headers get their names; the trunk's mapping applies."""
    async with api.LiveKitAPI(gateway.http_url, API_KEY, API_SECRET) as lk:
        trunk = await lk.sip.create_inbound_trunk(
            sip.CreateSIPInboundTrunkRequest(
                trunk=sip.SIPInboundTrunkInfo(
                    numbers=["+15550100"],
                    headers_to_attributes={"X-Customer": "customer"},
                    include_headers=sip.SIP_X_HEADERS,
                )
            )
        )
        rule = sip.SIPDispatchRule(dispatch_rule_direct=sip.SIPDispatchRuleDirect(room_name="r"))
        await lk.sip.create_dispatch_rule(
            sip.CreateSIPDispatchRuleRequest(
                dispatch_rule=sip.SIPDispatchRuleInfo(rule=rule, trunk_ids=[trunk.sip_trunk_id])
            )
        )
    extra = "X-Customer: 42\r\nX-Twilio-CallSid: CA123\r\nSubject: hello"
    invite = request("INVITE", port_of(gateway), body=OFFER, extra=extra)
    *_, ok = await phone.request(invite)
    assert ok.status == 200
    seen = await one_call(agent)
    assert seen.room == "r"
    attrs = seen.info.attributes
    assert attrs["customer"] == "42" and attrs["sip.twilio.callSid"] == "CA123"
    assert attrs["sip.h.x-customer"] == "42" and "sip.h.subject" not in attrs
    assert attrs["sip.callIDFull"] == ok.call_id and attrs["sip.callTag"] == ok.from_.tag
