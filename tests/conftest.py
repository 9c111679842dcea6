"""Shared fixtures: an embedded server on a free loopback port, started and stopped per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ServerConfig

API_KEY = DEV_API_KEY
API_SECRET = DEV_API_SECRET


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    """`callboard server` on 127.0.0.1:<free port> with the dev keys."""
    async with run_server(ServerConfig(port=0)) as srv:
        yield srv
