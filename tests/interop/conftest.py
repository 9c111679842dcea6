"""Interop fixtures: every test runs against `callboard server` and the real livekit-server.

Both servers run as subprocesses (symmetric, no event-loop sharing), one of each kind per test
session; tests use unique room names. The real livekit-server is built with Go on first use;
without Go its tests skip with the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from livekit import api

from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerProcess,
    ServerUnavailable,
    start_server,
    stop_process,
)
from tests.interop.support import (
    AgentWorker,
    start_agent_worker,
    stop_agent_worker,
    wait_registered,
)

CALLBOARD = "callboard"
LIVEKIT_SERVER = "livekit-server"
SERVER_KINDS = (CALLBOARD, LIVEKIT_SERVER)
NAMED_AGENT = "callboard-interop"


@pytest.fixture(scope="session", params=SERVER_KINDS)
def lk_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A running server of each kind, on a free loopback port with the keys devkey/secret."""
    kind: str = request.param
    try:
        server = start_server(kind, tmp_path_factory.mktemp(f"{kind}-log"))
    except ServerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        stop_process(server.proc)


@pytest.fixture
async def lk(lk_server: ServerProcess) -> AsyncIterator[api.LiveKitAPI]:
    """The official livekit-api client for the server under test."""
    async with api.LiveKitAPI(lk_server.http_url, API_KEY, API_SECRET) as client:
        yield client


@dataclass
class AgentWorkers:
    """One livekit-agents worker for automatic dispatch, one for explicit dispatch."""

    server: ServerProcess
    unnamed: AgentWorker
    named: AgentWorker

    def log_tails(self) -> str:
        """What to show when a wait fails: the workers' and the server's latest log lines."""
        server = f"--- {self.server.kind} log tail ---\n{self.server.log_tail(2000)}"
        return "\n".join((self.unnamed.log_tail(), self.named.log_tail(), server))


@pytest.fixture(scope="module")
def agent_workers(
    lk_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentWorkers]:
    """Real livekit-agents workers registered on the server under test (started in parallel).

    Module-scoped: the unnamed worker would take the automatic dispatch of every room other
    modules create.
    """
    workdir = tmp_path_factory.mktemp(f"agents-{lk_server.kind}")
    workers = [
        start_agent_worker(lk_server, "", workdir),
        start_agent_worker(lk_server, NAMED_AGENT, workdir),
    ]
    try:
        wait_registered(workers)
        yield AgentWorkers(lk_server, *workers)
    finally:
        for w in workers:
            stop_agent_worker(w)
