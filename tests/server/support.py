"""Helpers for the server tests: tokens, a raw /agent client, bounded polling, a bystander."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from livekit import api
from livekit.protocol import agent

from callboard.server.app import EmbeddedServer
from callboard.simworker import SimWorker, agent_ws_url
from callboard.simworker import agent_token as simworker_agent_token

DEFAULT_DEADLINE_S: Final = 5.0
BYSTANDER: Final = "bystander"


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = DEFAULT_DEADLINE_S
) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def agent_token(api_key: str, api_secret: str) -> str:
    """A valid /agent token (the `agent` video grant)."""
    return simworker_agent_token(api_key, api_secret)


def grant_token(api_key: str, api_secret: str, **grants: Any) -> str:
    """A token with the given `VideoGrants` (snake_case keyword arguments)."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_grants(api.VideoGrants(**grants))
        .with_ttl(datetime.timedelta(minutes=10))
        .to_jwt()
    )


class AgentClient:
    """A raw `/agent` WebSocket: sends exactly what a test says, reads what the server sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession):
        self.ws = ws
        self._session = session
        self._owns_session = False

    @classmethod
    async def connect(
        cls, server: EmbeddedServer, token: str, session: aiohttp.ClientSession | None = None
    ) -> AgentClient:
        return await cls.connect_url(server.url, token, session)

    @classmethod
    async def connect_url(
        cls, ws_url: str, token: str, session: aiohttp.ClientSession | None = None
    ) -> AgentClient:
        """Connect to `<ws_url>/agent` of any server (the real livekit-server too)."""
        own = session is None
        http = session or aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(
                agent_ws_url(ws_url),
                headers={"Authorization": f"Bearer {token}"},
                max_msg_size=0,
                autoclose=False,
            )
        except BaseException:
            if own:
                await http.close()
            raise
        client = cls(ws, http)
        client._owns_session = own
        return client

    async def send(self, msg: agent.WorkerMessage) -> None:
        await self.ws.send_bytes(msg.SerializeToString())

    async def recv(self, timeout: float = DEFAULT_DEADLINE_S) -> agent.ServerMessage:
        """The next ServerMessage; fails if the connection closes or nothing comes in time."""
        frame = await self.ws.receive(timeout=timeout)
        if frame.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"expected a binary ServerMessage, got {frame.type!r}")
        return agent.ServerMessage.FromString(frame.data)

    async def recv_kind(
        self, kind: str, timeout: float = DEFAULT_DEADLINE_S
    ) -> agent.ServerMessage:
        """The next ServerMessage, which must be of `kind` (a ServerMessage oneof name)."""
        msg = await self.recv(timeout)
        which = msg.WhichOneof("message")
        assert which == kind, f"expected {kind}, got {which}: {msg}"
        return msg

    async def register(self, agent_name: str = "", job_type: int = agent.JT_ROOM) -> str:
        """Register and return the worker id."""
        req = agent.RegisterWorkerRequest(type=job_type, agent_name=agent_name, version="test")  # type: ignore[arg-type]
        await self.send(agent.WorkerMessage(register=req))
        return (await self.recv_kind("register")).register.worker_id

    async def ping(self, timestamp: int | None = None) -> agent.WorkerPong:
        """WorkerPing → WorkerPong. Also a barrier: the server handled every earlier frame."""
        ts = timestamp if timestamp is not None else time.time_ns() // 1000
        await self.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=ts)))
        pong = (await self.recv_kind("pong")).pong
        assert pong.last_timestamp == ts
        return pong

    async def expect_closed(self, timeout: float = DEFAULT_DEADLINE_S) -> tuple[int, str]:
        """Wait for the server's close frame; return (close code, reason)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError("the server did not close the connection in time")
            frame = await self.ws.receive(timeout=remaining)
            if frame.type == aiohttp.WSMsgType.CLOSE:
                await self.ws.close()
                return int(frame.data), str(frame.extra or "")
            if frame.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return int(self.ws.close_code or 0), ""
            if frame.type == aiohttp.WSMsgType.ERROR:
                raise AssertionError(f"connection error instead of a close: {frame.data!r}")

    async def abort(self) -> None:
        """Drop the TCP connection with no close frame, like a worker that crashed."""
        connection = self.ws._response.connection
        assert connection is not None and connection.transport is not None
        connection.transport.abort()
        if self._owns_session:
            await self._session.close()

    async def aclose(self) -> None:
        await self.ws.close()
        if self._owns_session:
            await self._session.close()


async def serve_offers(client: AgentClient, served: list[str]) -> None:
    """Accept every offer and finish each assigned job at once, until the connection ends.

    Run it as a task once the test no longer reads from `client` itself.
    """
    while True:
        frame = await client.ws.receive()
        if frame.type != aiohttp.WSMsgType.BINARY:
            return
        msg = agent.ServerMessage.FromString(frame.data)
        if msg.WhichOneof("message") == "availability":
            job_id = msg.availability.job.id
            answer = agent.AvailabilityResponse(job_id=job_id, available=True)
            await client.send(agent.WorkerMessage(availability=answer))
        elif msg.WhichOneof("message") == "assignment":
            served.append(msg.assignment.job.id)
            done = agent.UpdateJobStatus(job_id=msg.assignment.job.id, status=agent.JS_SUCCESS)
            await client.send(agent.WorkerMessage(update_job=done))


@dataclass
class Dispatcher:
    """Twirp AgentDispatchService calls with admin tokens for whichever room is named."""

    server: EmbeddedServer
    api_key: str
    api_secret: str

    def client(self) -> api.LiveKitAPI:
        return api.LiveKitAPI(self.server.http_url, self.api_key, self.api_secret)

    async def create(self, room: str, agent_name: str) -> api.AgentDispatch:
        async with self.client() as lk:
            return await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room)
            )

    async def job_state(self, room: str, agent_name: str) -> agent.JobState:
        """The state of the one job of the one dispatch for `agent_name` in `room`."""
        async with self.client() as lk:
            dispatches = await lk.agent_dispatch.list_dispatch(room)
        (dispatch,) = [d for d in dispatches if d.agent_name == agent_name]
        (job,) = dispatch.state.jobs
        return job.state

    async def wait_job_status(self, room: str, agent_name: str, status: int) -> agent.JobState:
        """Poll ListDispatch until the job for `agent_name` in `room` reaches `status`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEFAULT_DEADLINE_S
        while True:
            state = await self.job_state(room, agent_name)
            if state.status == status:
                return state
            if loop.time() > deadline:
                raise AssertionError(
                    f"job in {room!r} is {agent.JobStatus.Name(state.status)}, "
                    f"expected {agent.JobStatus.Name(status)}"
                )
            await asyncio.sleep(0.02)


async def start_bystander(server: EmbeddedServer, api_key: str, api_secret: str) -> SimWorker:
    """A well-behaved worker for agent `bystander` that finishes each job at once."""
    sim = SimWorker(server.url, api_key, api_secret, agent_name=BYSTANDER, job_seconds=0.0)
    await sim.start()
    return sim


async def assert_bystander_works(
    server: EmbeddedServer, sim: SimWorker, api_key: str, api_secret: str, room: str
) -> None:
    """A new dispatch for the bystander is offered to it, runs and ends JS_SUCCESS."""
    dispatcher = Dispatcher(server, api_key, api_secret)
    done_before = len(sim.finished)
    await dispatcher.create(room, BYSTANDER)
    await wait_until(lambda: len(sim.finished) > done_before, "the bystander to finish a job")
    state = await dispatcher.wait_job_status(room, BYSTANDER, agent.JS_SUCCESS)
    assert state.worker_id == sim.worker_id
