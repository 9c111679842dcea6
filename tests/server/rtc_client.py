"""A raw `/rtc` client for the server tests: sends exactly what a test says, reads what the
server sends, and can answer subscriber offers with a real aiortc peer connection."""

from __future__ import annotations

import datetime
from typing import Any, Final

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from livekit import api
from livekit.protocol import rtc

from callboard.server.app import EmbeddedServer
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET

RECEIVE_TIMEOUT_S: Final = 5.0


def join_token(identity: str, room: str = "", **grants: Any) -> str:
    return (
        api.AccessToken(DEV_API_KEY, DEV_API_SECRET)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room, **grants))
        .with_ttl(datetime.timedelta(minutes=10))
        .to_jwt()
    )


def without_candidates(sdp: str) -> str:
    """`sdp` with no ICE candidates and no end-of-candidates: ICE waits, nothing is sent."""
    return "".join(
        line
        for line in sdp.splitlines(keepends=True)
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    )


class RtcClient:
    """One signalling connection; `answer()` answers the pending subscriber offer for real."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession):
        self.ws = ws
        self._session = session
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.join: rtc.JoinResponse | None = None
        self.offer: rtc.SessionDescription | None = None
        self.updates: list[rtc.ParticipantUpdate] = []

    @classmethod
    async def connect(cls, server: EmbeddedServer, token: str, query: str = "") -> RtcClient:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                f"{server.url}/rtc?{query}", headers={"Authorization": f"Bearer {token}"}
            )
        except BaseException:
            await session.close()
            raise
        client = cls(ws, session)
        while client.join is None or client.offer is None:
            await client.receive()
        return client

    async def receive(self, timeout: float = RECEIVE_TIMEOUT_S) -> rtc.SignalResponse | None:
        """The next SignalResponse (also recorded); None when the server closed."""
        frame = await self.ws.receive(timeout=timeout)
        if frame.type != aiohttp.WSMsgType.BINARY:
            return None
        msg = rtc.SignalResponse()
        msg.ParseFromString(frame.data)
        which = msg.WhichOneof("message")
        if which == "join":
            self.join = msg.join
        elif which == "offer":
            self.offer = msg.offer
        elif which == "update":
            self.updates.append(msg.update)
        return msg

    async def send(self, req: rtc.SignalRequest) -> None:
        await self.ws.send_bytes(req.SerializeToString())

    async def answer(self) -> str:
        """Answer the last subscriber offer with aiortc; the answer's SDP.

        Both sides' ICE candidates are left out: these tests run in the machine's own network
        namespace, where the candidates are its interface addresses, and send no media."""
        assert self.offer is not None
        offer = without_candidates(self.offer.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        sdp = without_candidates(str(self.pc.localDescription.sdp))
        await self.send(rtc.SignalRequest(answer=rtc.SessionDescription(type="answer", sdp=sdp)))
        return sdp

    async def closed_by_server(self, timeout: float = RECEIVE_TIMEOUT_S) -> bool:
        """Read until the server closes the connection (True) or `timeout` passes (False)."""
        try:
            while await self.receive(timeout) is not None:
                pass
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        await self.pc.close()
        await self.ws.close()
        await self._session.close()
