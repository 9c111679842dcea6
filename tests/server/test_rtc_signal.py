"""`/rtc` against bad clients: each mistake ends that client's connection with its reason
logged (with room and identity); the room and its other participants carry on."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
import jwt
import pytest
from livekit.protocol import models, rtc

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig
from callboard.server.rtc import peer
from callboard.server.rtc.model import participant_info
from tests.server.rtc_client import RtcClient, join_token, without_candidates
from tests.server.support import wait_until
from tests.server.test_rtc_room import Phone, audio_track

ROOM: Final = "bad-input"
ANSWER_TIMEOUT_S: Final = 0.5
LIMIT: Final = 16


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    config = ServerConfig(
        port=0, rtc_answer_timeout=ANSWER_TIMEOUT_S, rtc_join_timeout=ANSWER_TIMEOUT_S
    )
    async with run_server(config) as srv:
        yield srv


@pytest.fixture
async def bystander(server: EmbeddedServer) -> AsyncIterator[RtcClient]:
    """A well-behaved participant of the room, its subscriber offer answered."""
    client = await RtcClient.connect(server, join_token("bystander", ROOM))
    await client.answer()
    yield client
    await client.aclose()


def ended_reasons(caplog: pytest.LogCaptureFixture, identity: str) -> list[str]:
    return [
        str(r.__dict__["reason"])
        for r in caplog.records
        if r.getMessage() == "rtc connection ended"
        and r.__dict__.get("identity") == identity
        and r.__dict__.get("room") == ROOM
    ]


async def still_serves(server: EmbeddedServer, bystander: RtcClient, gone: str) -> None:
    """The bystander saw `gone` leave, still gets answers, and is still in the room."""
    while not any(
        p.identity == gone and p.state == models.ParticipantInfo.DISCONNECTED
        for u in bystander.updates
        for p in u.participants
    ):
        assert await bystander.receive() is not None
    await bystander.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=42)))
    while (msg := await bystander.receive()) is not None and not msg.HasField("pong_resp"):
        pass
    assert msg is not None and msg.pong_resp.last_ping_timestamp == 42
    assert list(server.rooms.live_room(ROOM).participants) == ["bystander"]


async def send_garbage(client: RtcClient) -> None:
    await client.ws.send_bytes(b"\xff\x00 not a protobuf \xff")


async def send_text(client: RtcClient) -> None:
    await client.ws.send_str('{"offer": {}}')


async def answer_twice(client: RtcClient) -> None:
    sdp = await client.answer()
    await client.send(rtc.SignalRequest(answer=rtc.SessionDescription(type="answer", sdp=sdp)))


async def offer_garbage_sdp(client: RtcClient) -> None:
    offer = rtc.SessionDescription(type="offer", sdp="this is not an SDP")
    await client.send(rtc.SignalRequest(offer=offer))


async def offer_broken_sdp(client: RtcClient) -> None:
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio notaport UDP/TLS/RTP/SAVPF x\r\n"
    )
    await client.send(rtc.SignalRequest(offer=rtc.SessionDescription(type="offer", sdp=sdp)))


async def never_answer(client: RtcClient) -> None:
    """The subscriber offer stays unanswered past the answer timeout."""


BAD_CLIENTS: Final[dict[str, tuple[Callable[[RtcClient], Awaitable[None]], str]]] = {
    "garbage frame": (send_garbage, "a frame that is not a SignalRequest"),
    "text frame": (send_text, "a text frame"),
    "answer out of order": (answer_twice, "no subscriber offer was outstanding"),
    "unparsable SDP": (offer_garbage_sdp, "unusable publisher offer: not an SDP"),
    "broken SDP": (offer_broken_sdp, "unusable publisher offer SDP"),
    "subscriber never answers": (
        never_answer,
        f"did not answer the first subscriber offer within {ANSWER_TIMEOUT_S:g}s",
    ),
}


@pytest.mark.parametrize("mistake", list(BAD_CLIENTS))
async def test_a_bad_client_loses_its_connection_and_the_room_carries_on(
    server: EmbeddedServer,
    bystander: RtcClient,
    caplog: pytest.LogCaptureFixture,
    mistake: str,
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    act, reason = BAD_CLIENTS[mistake]
    bad = await RtcClient.connect(server, join_token("mallory", ROOM))
    try:
        await act(bad)
        assert await bad.closed_by_server(timeout=ANSWER_TIMEOUT_S + 5)
    finally:
        await bad.aclose()
    await still_serves(server, bystander, "mallory")
    await wait_until(lambda: bool(ended_reasons(caplog, "mallory")), "the reason in the log")
    (logged,) = ended_reasons(caplog, "mallory")
    assert reason in logged


async def test_a_token_for_another_room_is_refused_with_its_reason_logged(
    server: EmbeddedServer, bystander: RtcClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    async with aiohttp.ClientSession() as http:
        url = f"{server.url}/rtc?room={ROOM}"
        headers = {"Authorization": f"Bearer {join_token('mallory', 'another-room')}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers=headers)
        assert refused.value.status == 401
        async with http.get(f"{server.http_url}/rtc/validate?room={ROOM}", headers=headers) as resp:
            assert resp.status == 401
            assert "the token is for room 'another-room', not 'bad-input'" in await resp.text()
    (record,) = [r for r in caplog.records if r.getMessage() == "rtc join refused"]
    assert (record.__dict__["room"], record.__dict__["identity"]) == ("another-room", "mallory")
    assert list(server.rooms.live_room(ROOM).participants) == ["bystander"]


@pytest.mark.parametrize(
    ("grants", "status", "message"),
    [
        ({"roomJoin": False, "room": ROOM}, 401, "lacks the roomJoin grant"),
        ({"roomJoin": True}, 400, "names no room"),
    ],
)
async def test_joins_without_the_grants_are_refused(
    server: EmbeddedServer, grants: dict[str, object], status: int, message: str
) -> None:
    claims = {"iss": DEV_API_KEY, "sub": "x", "exp": int(time.time()) + 600, "video": grants}
    token = jwt.encode(claims, DEV_API_SECRET, algorithm="HS256")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{server.http_url}/rtc/validate", headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        assert resp.status == status
        assert message in await resp.text()


async def test_single_peer_connection_path_answers_404_so_sdks_fall_back(
    server: EmbeddedServer,
) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/rtc/v1") as resp:
        assert resp.status == 404


def trickle(port: int) -> rtc.SignalRequest:
    """A publisher candidate on loopback (nothing listens there; nothing leaves the host)."""
    init = {"candidate": f"candidate:{port} 1 udp 2122260223 127.0.0.1 {port} typ host"}
    init |= {"sdpMid": "0", "sdpMLineIndex": 0}
    return rtc.SignalRequest(
        trickle=rtc.TrickleRequest(candidateInit=json.dumps(init), target=rtc.PUBLISHER)
    )


async def test_ice_candidates_are_bounded_per_negotiation_and_the_client_stays(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK trickles dozens of candidates per negotiation; past the limit they are dropped
    with one warning per negotiation, the count starts again at each SDP, and the client
    stays."""
    caplog.set_level(logging.INFO, logger="callboard")
    monkeypatch.setattr(peer, "MAX_CANDIDATES_PER_SDP", LIMIT)  # the real one is 1000
    client = await RtcClient.connect(server, join_token("chatty", ROOM))
    try:
        await client.answer()
        for port in range(LIMIT + 6):
            await client.send(trickle(10000 + port))
        client.pc.addTransceiver("audio", direction="sendonly")
        await client.pc.setLocalDescription(await client.pc.createOffer())
        offer = without_candidates(str(client.pc.localDescription.sdp))
        await client.send(rtc.SignalRequest(offer=rtc.SessionDescription(type="offer", sdp=offer)))
        for port in range(LIMIT + 1):
            await client.send(trickle(20000 + port))
        await client.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=7)))
        while (msg := await client.receive()) is not None and not msg.HasField("pong_resp"):
            pass
        assert msg is not None, "the server ended the connection"
        assert "chatty" in server.rooms.live_room(ROOM).participants
    finally:
        await client.aclose()
    dropped = [r for r in caplog.records if r.getMessage().startswith("ICE candidates dropped")]
    assert [r.__dict__["connection"] for r in dropped] == ["publisher", "publisher"]


async def test_an_unanswered_renegotiation_asks_the_client_to_join_again(
    server: EmbeddedServer, bystander: RtcClient, caplog: pytest.LogCaptureFixture
) -> None:
    """As livekit-server: a later subscriber offer left unanswered (here: for a track a phone
    published) ends the connection with a leave that tells the SDK to join again."""
    caplog.set_level(logging.INFO, logger="callboard")
    bad = await RtcClient.connect(server, join_token("mallory", ROOM))
    try:
        await bad.answer()
        live = server.rooms.live_room(ROOM)
        phone = live.join(participant_info("sip_+15550100"), Phone(), auto_subscribe=False)
        live.activate(phone)
        live.publish(phone, audio_track("phone"))
        leaves = []
        while (msg := await bad.receive(ANSWER_TIMEOUT_S + 5)) is not None:
            if msg.HasField("leave"):
                leaves.append(msg.leave)
    finally:
        await bad.aclose()
    assert [(x.action, x.can_reconnect) for x in leaves] == [(rtc.LeaveRequest.RECONNECT, True)]
    await wait_until(lambda: bool(ended_reasons(caplog, "mallory")), "the reason in the log")
    assert "did not answer a subscriber offer within" in ended_reasons(caplog, "mallory")[0]
