"""Fixtures of the worker tests (the embedded `server` fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.worker.fake_server import FakeAgentServer


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgentServer]:
    """A protocol-level fake /agent endpoint on a free loopback port."""
    srv = FakeAgentServer()
    await srv.start()
    yield srv
    await srv.aclose()
