"""A job whose JobAssignment a connection cut swallowed, on both servers, frame by frame.

The worker accepted, the server sent the assignment, the connection died before the worker
confirmed the job (no UpdateJobStatus), and the worker's next session claims the job with a
MigrateJobRequest. livekit-server 1.13.5 ignores the claim (`HandleMigrateJob` is empty) and
never offers the job again: the call is left unserved, listed as running. callboard server
sends the assignment again to the claimant, so the call is served at once.
"""

from __future__ import annotations

import contextlib
from typing import Final

import pytest
from livekit import api
from livekit.protocol import agent

from tests.interop.conftest import CALLBOARD, LIVEKIT_SERVER
from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess
from tests.interop.support import unique
from tests.server.support import AgentClient, agent_token

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60, func_only=True)]

OFFER_TIMEOUT_S: Final = 10.0
"""livekit-server offers a job ~200 ms after the dispatch, more on a busy machine."""
QUIET_S: Final = 3.0
"""How long the claimant waits for an assignment livekit-server never sends."""


async def register(lk_server: ServerProcess, agent_name: str) -> AgentClient:
    client = await AgentClient.connect_url(lk_server.ws_url, agent_token(API_KEY, API_SECRET))
    await client.register(agent_name)
    return client


async def test_a_claimed_job_whose_assignment_was_lost(
    lk: api.LiveKitAPI, lk_server: ServerProcess
) -> None:
    name, room = unique("lost-agent"), unique("lost-room")
    first = await register(lk_server, name)
    await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name=name, room=room)
    )
    offer = (await first.recv_kind("availability", OFFER_TIMEOUT_S)).availability
    answer = agent.AvailabilityResponse(job_id=offer.job.id, available=True)
    await first.send(agent.WorkerMessage(availability=answer))
    assert (await first.recv_kind("assignment")).assignment.job.id == offer.job.id
    await first.abort()  # the cut: as far as this worker is concerned, the assignment was lost

    second = await register(lk_server, name)
    try:
        claim = agent.MigrateJobRequest(job_ids=[offer.job.id])
        await second.send(agent.WorkerMessage(migrate_job=claim))
        if lk_server.kind == CALLBOARD:
            again = (await second.recv_kind("assignment")).assignment
            assert again.job.id == offer.job.id
        else:
            assert lk_server.kind == LIVEKIT_SERVER
            with pytest.raises(TimeoutError):
                msg = await second.ws.receive(timeout=QUIET_S)
                pytest.fail(f"livekit-server sent {msg!r} after the claim")
    finally:
        with contextlib.suppress(Exception):
            await second.aclose()
