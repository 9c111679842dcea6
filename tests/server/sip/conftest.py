"""SIP test fixtures: the embedded server with its gateway on free loopback ports, and a
stand-in agent that joins the rooms phones call into."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from tests.server.sip.room_agent import RoomAgent, room_agent


@pytest.fixture
async def gateway() -> AsyncIterator[EmbeddedServer]:
    """`callboard server` with its SIP gateway, both on free loopback ports."""
    async with run_server(ServerConfig(port=0, sip_port=0)) as srv:
        yield srv


@pytest.fixture
async def agent(gateway: EmbeddedServer) -> AsyncIterator[RoomAgent]:
    """Joins every room a phone participant appears in, and so lets calls be answered."""
    async with room_agent(gateway) as joined:
        yield joined
