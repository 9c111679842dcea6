"""Cluster fixtures: a fresh Redis + livekit-server nodes per test (tests stop nodes and kill
workers), the test's fleet of callboard workers, and a caller placing calls through the nodes.

Skips with the reason when redis-server or Go (to build livekit-server) is missing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import Cluster, running_cluster
from tests.cluster.fleet import Caller, Fleet
from tests.interop.livekit_server import ServerUnavailable
from tests.server.sip.redis_server import RedisUnavailable

DEFAULT_NODES = 2


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """`nodes` livekit-server nodes sharing a Redis (indirect parameter, default 2)."""
    nodes = getattr(request, "param", DEFAULT_NODES)
    try:
        with running_cluster(tmp_path / "cluster", nodes) as c:
            yield c
    except (RedisUnavailable, ServerUnavailable) as e:
        pytest.skip(str(e))


@pytest.fixture
def fleet(cluster: Cluster, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(cluster, tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
async def caller(cluster: Cluster) -> AsyncIterator[Caller]:
    c = Caller(cluster.nodes)
    try:
        yield c
    finally:
        await c.aclose()
