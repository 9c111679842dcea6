"""The /agent endpoint: registration, bad frames, worker status, migration, offers, assignment.

Each misbehaving connection is closed on its own, with a close code and a reason, while a
well-behaved worker connected beside it keeps getting and running jobs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import jwt
import pytest
from aiohttp import WSCloseCode
from google.protobuf.message import DecodeError
from livekit import api
from livekit.protocol import agent, models

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import AGENT_TOKEN_TTL_S, MAX_AGENT_FRAME_BYTES, ServerConfig
from callboard.server.ids import BASE57
from callboard.server.workers import WorkerSession
from callboard.simworker import SimWorker
from tests.conftest import API_KEY, API_SECRET
from tests.server.support import (
    BYSTANDER,
    AgentClient,
    Dispatcher,
    agent_token,
    assert_bystander_works,
    serve_offers,
    start_bystander,
    wait_until,
)

FAST_REGISTER_S: Final = 0.3
FAST_AVAILABILITY_S: Final = 1.0
FAST_MIGRATION_S: Final = 0.3
GARBAGE: Final = b"\xff\xff\xff\xff not a protobuf"


@pytest.fixture
async def fast_server() -> AsyncIterator[EmbeddedServer]:
    """A server with short register, availability and migration timeouts."""
    config = ServerConfig(
        port=0,
        register_timeout=FAST_REGISTER_S,
        availability_timeout=FAST_AVAILABILITY_S,
        migration_grace=FAST_MIGRATION_S,
    )
    async with run_server(config) as srv:
        yield srv


@pytest.fixture
async def bystander(server: EmbeddedServer) -> AsyncIterator[SimWorker]:
    sim = await start_bystander(server, API_KEY, API_SECRET)
    yield sim
    await sim.aclose()


async def connect(server: EmbeddedServer) -> AgentClient:
    return await AgentClient.connect(server, agent_token(API_KEY, API_SECRET))


def dispatcher(server: EmbeddedServer) -> Dispatcher:
    return Dispatcher(server, API_KEY, API_SECRET)


def session_of(server: EmbeddedServer, worker_id: str) -> WorkerSession:
    (session,) = [w for w in server.engine.workers if w.id == worker_id]
    return session


def worker_ids(server: EmbeddedServer) -> set[str]:
    return {w.id for w in server.engine.workers}


async def accept(client: AgentClient, **answer: object) -> agent.JobAssignment:
    """Accept the next offer (with `answer`'s AvailabilityResponse fields); its assignment."""
    offer = (await client.recv_kind("availability")).availability
    resp = agent.AvailabilityResponse(job_id=offer.job.id, available=True, **answer)  # type: ignore[arg-type]
    await client.send(agent.WorkerMessage(availability=resp))
    assignment = (await client.recv_kind("assignment")).assignment
    assert assignment.job.id == offer.job.id
    return assignment


def migrate(*job_ids: str) -> agent.WorkerMessage:
    return agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=job_ids))


async def take_job(client: AgentClient, **answer: object) -> agent.JobAssignment:
    """Accept the next offer (with `answer`'s AvailabilityResponse fields) and report RUNNING."""
    assignment = await accept(client, **answer)
    running = agent.UpdateJobStatus(job_id=assignment.job.id, status=agent.JS_RUNNING)
    await client.send(agent.WorkerMessage(update_job=running))
    await client.ping()
    return assignment


# -- registration ------------------------------------------------------------------------------


async def test_register_response_has_worker_id_and_server_info() -> None:
    async with run_server(ServerConfig(port=0, region="test-region")) as server:
        client = await connect(server)
        req = agent.RegisterWorkerRequest(type=agent.JT_ROOM, agent_name="a", version="1")
        await client.send(agent.WorkerMessage(register=req))
        resp = (await client.recv_kind("register")).register
        assert re.fullmatch(f"AW_[{BASE57}]{{12}}", resp.worker_id)
        info = resp.server_info
        assert info.region == "test-region"
        assert info.node_id == server.node_id and info.node_id.startswith("ND_")
        assert info.edition == models.ServerInfo.Standard
        assert info.version and info.protocol > 0 and info.agent_protocol > 0
        assert worker_ids(server) == {resp.worker_id}
        await client.aclose()
        await wait_until(lambda: not server.engine.workers, "the worker to be unregistered")


async def test_ping_gets_a_pong_before_and_after_register(server: EmbeddedServer) -> None:
    client = await connect(server)
    before = await client.ping(timestamp=1234567)
    assert before.last_timestamp == 1234567 and before.timestamp > 0
    await client.register()
    after = await client.ping(timestamp=-5)
    assert after.last_timestamp == -5
    await client.aclose()


# -- connections closed for bad frames -----------------------------------------------------------


async def send_non_register_first(client: AgentClient) -> None:
    await client.send(agent.WorkerMessage(update_worker=agent.UpdateWorkerStatus(load=0.1)))


async def send_garbage(client: AgentClient) -> None:
    with pytest.raises(DecodeError):
        agent.WorkerMessage.FromString(GARBAGE)
    await client.ws.send_bytes(GARBAGE)


async def send_garbage_after_register(client: AgentClient) -> None:
    await client.register()
    await send_garbage(client)


async def send_text(client: AgentClient) -> None:
    await client.ws.send_str('{"register": {}}')


async def send_oversized(client: AgentClient) -> None:
    await client.ws.send_bytes(b"\x00" * (MAX_AGENT_FRAME_BYTES + 1))


async def register_twice(client: AgentClient) -> None:
    await client.register()
    await client.send(agent.WorkerMessage(register=agent.RegisterWorkerRequest()))


async def send_empty_message_after_register(client: AgentClient) -> None:
    await client.register()
    await client.send(agent.WorkerMessage())


async def register_unknown_job_type(client: AgentClient) -> None:
    await client.send(agent.WorkerMessage(register=agent.RegisterWorkerRequest(type=42)))  # type: ignore[arg-type]


async def register_unknown_track_source(client: AgentClient) -> None:
    perms = models.ParticipantPermission(can_publish=True)
    perms.can_publish_sources.extend([models.MICROPHONE, 99])  # type: ignore[list-item]
    await client.send(
        agent.WorkerMessage(register=agent.RegisterWorkerRequest(allowed_permissions=perms))
    )


VIOLATIONS: Final[dict[str, tuple[Callable[[AgentClient], Awaitable[None]], int, str]]] = {
    "first frame not register": (
        send_non_register_first,
        WSCloseCode.POLICY_VIOLATION,
        "expected register as the first message, got update_worker",
    ),
    "garbage bytes": (send_garbage, WSCloseCode.UNSUPPORTED_DATA, "not a valid protobuf"),
    "garbage after register": (
        send_garbage_after_register,
        WSCloseCode.UNSUPPORTED_DATA,
        "not a valid protobuf",
    ),
    "text frame": (send_text, WSCloseCode.UNSUPPORTED_DATA, "text frames are not supported"),
    "oversized frame": (send_oversized, WSCloseCode.MESSAGE_TOO_BIG, ""),
    "register twice": (register_twice, WSCloseCode.POLICY_VIOLATION, "register sent twice"),
    "empty message": (
        send_empty_message_after_register,
        WSCloseCode.POLICY_VIOLATION,
        "empty or unknown WorkerMessage",
    ),
    "unknown job type": (
        register_unknown_job_type,
        WSCloseCode.POLICY_VIOLATION,
        "unknown job type 42",
    ),
    # Regression: accepted, then every assignment to it raised in the placement task and
    # the job stayed JS_PENDING forever.
    "unknown track source": (
        register_unknown_track_source,
        WSCloseCode.POLICY_VIOLATION,
        "unknown track source 99 in register allowed_permissions",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
async def test_bad_frame_closes_only_that_connection(
    server: EmbeddedServer, bystander: SimWorker, case: str
) -> None:
    misbehave, code, reason = VIOLATIONS[case]
    client = await connect(server)
    await misbehave(client)
    closed_code, closed_reason = await client.expect_closed()
    assert closed_code == code
    assert reason in closed_reason
    await client.aclose()
    await wait_until(lambda: worker_ids(server) == {bystander.worker_id}, "only the bystander")
    await assert_bystander_works(server, bystander, API_KEY, API_SECRET, f"r-{case}")


async def test_no_register_within_the_timeout_closes_the_connection(
    fast_server: EmbeddedServer,
) -> None:
    sim = await start_bystander(fast_server, API_KEY, API_SECRET)
    client = await connect(fast_server)
    await client.ping()  # answered, but it does not count as registering
    code, reason = await client.expect_closed(timeout=FAST_REGISTER_S + 2.0)
    assert code == WSCloseCode.POLICY_VIOLATION
    assert reason == f"no register message within {FAST_REGISTER_S:g}s"
    await client.aclose()
    await assert_bystander_works(fast_server, sim, API_KEY, API_SECRET, "r-after-timeout")
    await sim.aclose()


async def test_worker_vanishing_mid_reply_is_an_ordinary_disconnect(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a worker dropping its TCP connection while the server answered it made
    the handler raise ConnectionResetError, which aiohttp logged as "Error handling request"
    with a traceback, for every such disconnect."""
    for _ in range(3):
        client = await connect(server)
        await client.register()
        for _ in range(500):
            await client.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=1)))
        await client.abort()
        await wait_until(lambda: not server.engine.workers, "the worker to be removed")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# -- worker status -------------------------------------------------------------------------------


async def set_status(client: AgentClient, status: int, load: float) -> None:
    upd = agent.UpdateWorkerStatus(status=status, load=load)  # type: ignore[arg-type]
    await client.send(agent.WorkerMessage(update_worker=upd))
    await client.ping()


async def test_worker_status_is_kept_per_worker_and_full_gets_no_offers(
    server: EmbeddedServer,
) -> None:
    full, free = await connect(server), await connect(server)
    full_id, free_id = await full.register("status"), await free.register("other")
    await set_status(full, agent.WS_FULL, 0.25)
    assert (session_of(server, full_id).status, session_of(server, full_id).load) == (
        agent.WS_FULL,
        0.25,
    )
    assert (session_of(server, free_id).status, session_of(server, free_id).load) == (
        agent.WS_AVAILABLE,
        0.0,
    )

    await dispatcher(server).create("r-full", "status")
    state = await dispatcher(server).wait_job_status("r-full", "status", agent.JS_FAILED)
    assert state.reason == agent.JSR_NO_CAPACITY
    await full.ping()  # the next frame is the pong: no AvailabilityRequest came

    await set_status(full, agent.WS_AVAILABLE, 0.25)
    await dispatcher(server).create("r-available", "status")
    offer = (await full.recv_kind("availability")).availability
    assert offer.job.room.name == "r-available"
    await full.aclose()
    await free.aclose()


async def offers_to(server: EmbeddedServer, loads: dict[str, float], jobs: int) -> dict[str, int]:
    """Dispatch `jobs` jobs to workers reporting `loads`; how many offers each worker got."""
    sims = {
        name: SimWorker(server.url, API_KEY, API_SECRET, agent_name="weighted") for name in loads
    }
    for name, sim in sims.items():
        await sim.start()
        await sim.update_status(agent.WS_AVAILABLE, loads[name])
    sessions = {name: session_of(server, sim.worker_id) for name, sim in sims.items()}
    await wait_until(
        lambda: all(sessions[n].load == pytest.approx(load) for n, load in loads.items()),
        "every load report",
    )
    async with dispatcher(server).client() as lk:
        for i in range(jobs):
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name="weighted", room=f"r-weighted-{i}")
            )
    await wait_until(
        lambda: sum(len(s.finished) for s in sims.values()) == jobs, "every job to finish"
    )
    for sim in sims.values():
        await sim.aclose()
    return {name: sim.offers for name, sim in sims.items()}


async def test_load_weights_the_choice_and_full_load_gets_no_offers(
    server: EmbeddedServer,
) -> None:
    offers = await offers_to(server, {"idle": 0.0, "busy": 0.95, "saturated": 1.0}, jobs=20)
    assert offers["saturated"] == 0
    assert offers["idle"] + offers["busy"] == 20
    # P(busy gets >= 10 of 20) with weights 1 : 0.05 is about 1e-8.
    assert offers["busy"] < offers["idle"]


@pytest.mark.parametrize(
    ("load", "recorded"),
    [(math.nan, 1.0), (math.inf, 1.0), (-math.inf, 1.0), (-3.0, 0.0), (7.0, 1.0)],
)
async def test_absurd_load_reports_do_not_break_placement(
    server: EmbeddedServer, bystander: SimWorker, load: float, recorded: float
) -> None:
    """A nonsensical load is clamped to [0, 1] and never stops the others from getting jobs.

    Regression: a load of -inf became an infinite weight, `random.choices` raised inside the
    placement task and every job for that agent name stayed pending forever.
    """
    odd = await connect(server)
    odd_id = await odd.register(BYSTANDER)
    await set_status(odd, agent.WS_AVAILABLE, load)
    assert session_of(server, odd_id).load == recorded
    served: list[str] = []
    serving = asyncio.create_task(serve_offers(odd, served))
    async with dispatcher(server).client() as lk:
        for i in range(4):
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=BYSTANDER, room=f"r-odd-{i}")
            )
    await wait_until(lambda: len(bystander.finished) + len(served) == 4, "every job to be placed")
    await odd.aclose()
    await serving


# -- job updates and migration -------------------------------------------------------------------


async def test_update_for_an_unknown_or_foreign_job_is_ignored(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    owner, other = await connect(server), await connect(server)
    await owner.register("upd")
    await other.register("someone-else")
    await dispatcher(server).create("r-upd", "upd")
    job_id = (await take_job(owner)).job.id

    for job in ("AJ_doesnotexist", job_id):
        upd = agent.UpdateJobStatus(job_id=job, status=agent.JS_FAILED, error="not mine")
        await other.send(agent.WorkerMessage(update_job=upd))
        await other.ping()  # still connected, still answering
    ignored = [r for r in caplog.records if "does not run, ignored" in r.getMessage()]
    assert [getattr(r, "job_id", None) for r in ignored] == ["AJ_doesnotexist", job_id]
    state = await dispatcher(server).job_state("r-upd", "upd")
    assert state.status == agent.JS_RUNNING
    await owner.aclose()
    await other.aclose()


async def test_availability_answer_for_a_job_never_offered_is_ignored(
    server: EmbeddedServer,
) -> None:
    client = await connect(server)
    await client.register()
    answer = agent.AvailabilityResponse(job_id="AJ_nothing", available=True)
    await client.send(agent.WorkerMessage(availability=answer))
    await client.ping()
    await client.aclose()


async def test_migrate_after_reconnect_reattaches_the_job(server: EmbeddedServer) -> None:
    first = await connect(server)
    first_id = await first.register("mig")
    dispatch = await dispatcher(server).create("r-mig", "mig")
    job_id = (await take_job(first)).job.id
    await first.aclose()
    await wait_until(lambda: first_id not in worker_ids(server), "the first session to end")

    second = await connect(server)
    second_id = await second.register("mig")
    await second.send(migrate(job_id))
    await second.ping()
    state = await dispatcher(server).job_state("r-mig", "mig")
    assert (state.status, state.worker_id) == (agent.JS_RUNNING, second_id)

    async with dispatcher(server).client() as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch.id, "r-mig")
    termination = (await second.recv_kind("termination")).termination
    assert termination.job_id == job_id
    await second.aclose()


async def test_job_not_migrated_within_the_grace_fails_naming_the_worker(
    fast_server: EmbeddedServer,
) -> None:
    client = await connect(fast_server)
    worker_id = await client.register("gone")
    await dispatcher(fast_server).create("r-gone", "gone")
    await take_job(client)
    await client.aclose()
    state = await dispatcher(fast_server).wait_job_status("r-gone", "gone", agent.JS_FAILED)
    assert f"worker {worker_id} disconnected" in state.error
    assert "MigrateJobRequest" in state.error


async def test_a_claimed_job_its_worker_never_confirmed_gets_its_assignment_again(
    server: EmbeddedServer,
) -> None:
    first = await connect(server)
    first_id = await first.register("lost")
    await dispatcher(server).create("r-lost", "lost")
    # the assignment is "lost": the worker never reports on the job
    job = (await accept(first, participant_identity="agent-lost")).job
    await first.abort()
    await wait_until(lambda: first_id not in worker_ids(server), "the first session to end")

    second = await connect(server)
    second_id = await second.register("lost")
    await second.send(migrate(job.id))
    again = (await second.recv_kind("assignment")).assignment
    assert again.job.id == job.id and again.job.state.worker_id == second_id
    claims = api.TokenVerifier(API_KEY, API_SECRET).verify(again.token)
    assert (claims.identity, claims.video.room) == ("agent-lost", "r-lost")  # type: ignore[union-attr]
    state = await dispatcher(server).job_state("r-lost", "lost")
    assert (state.status, state.worker_id) == (agent.JS_RUNNING, second_id)

    done = agent.UpdateJobStatus(job_id=job.id, status=agent.JS_SUCCESS)
    await second.send(agent.WorkerMessage(update_job=done))
    state = await dispatcher(server).wait_job_status("r-lost", "lost", agent.JS_SUCCESS)
    assert state.worker_id == second_id
    await second.aclose()


async def test_an_unconfirmed_job_nobody_claims_is_offered_again_not_failed(
    fast_server: EmbeddedServer,
) -> None:
    """Its assignment may never have arrived and no session claimed it within the grace: the
    job is offered again (resuming), here to another worker, instead of failing. A later claim
    by the lost worker's next session is answered with a JobTermination for its stale copy."""
    lost = await connect(fast_server)
    await lost.register("resume")
    await dispatcher(fast_server).create("r-resume", "resume")
    job = (await accept(lost)).job
    other = await connect(fast_server)
    other_id = await other.register("resume")
    await lost.abort()

    offer = (await other.recv_kind("availability", timeout=FAST_MIGRATION_S + 5)).availability
    assert offer.job.id == job.id and offer.resuming
    await other.send(
        agent.WorkerMessage(availability=agent.AvailabilityResponse(job_id=job.id, available=True))
    )
    assert (await other.recv_kind("assignment")).assignment.job.id == job.id
    running = agent.UpdateJobStatus(job_id=job.id, status=agent.JS_RUNNING)
    await other.send(agent.WorkerMessage(update_job=running))
    state = await dispatcher(fast_server).wait_job_status("r-resume", "resume", agent.JS_RUNNING)
    assert state.worker_id == other_id and state.error == ""

    back = await connect(fast_server)
    await back.register("resume")
    await back.send(migrate(job.id))
    assert (await back.recv_kind("termination")).termination.job_id == job.id
    state = await dispatcher(fast_server).job_state("r-resume", "resume")
    assert (state.status, state.worker_id) == (agent.JS_RUNNING, other_id)
    for client in (other, back):
        await client.aclose()


async def test_a_claim_for_a_job_the_server_never_got_an_accept_for_is_terminated(
    fast_server: EmbeddedServer,
) -> None:
    """The worker's accept was lost in the cut (the server moved the offer on): the claims of
    its next session, while the job is offered elsewhere and once it runs there, cannot be
    served: each gets a JobTermination (freeing the waiting accept) and the job stays put."""
    cut = await connect(fast_server)
    await cut.register("unanswered")
    await dispatcher(fast_server).create("r-unanswered", "unanswered")
    job_id = (await cut.recv_kind("availability")).availability.job.id
    other = await connect(fast_server)
    other_id = await other.register("unanswered")
    await cut.abort()
    assert (await other.recv_kind("availability")).availability.job.id == job_id

    back = await connect(fast_server)
    await back.register("unanswered")
    await back.send(migrate(job_id))
    assert (await back.recv_kind("termination")).termination.job_id == job_id
    await other.send(
        agent.WorkerMessage(availability=agent.AvailabilityResponse(job_id=job_id, available=True))
    )
    assert (await other.recv_kind("assignment")).assignment.job.id == job_id
    running = agent.UpdateJobStatus(job_id=job_id, status=agent.JS_RUNNING)
    await other.send(agent.WorkerMessage(update_job=running))
    await other.ping()

    await back.send(migrate(job_id))
    assert (await back.recv_kind("termination")).termination.job_id == job_id
    state = await dispatcher(fast_server).job_state("r-unanswered", "unanswered")
    assert (state.status, state.worker_id) == (agent.JS_RUNNING, other_id)
    for client in (other, back):
        await client.aclose()


# -- offers and assignment -----------------------------------------------------------------------


async def test_unanswered_offer_moves_to_the_next_worker(fast_server: EmbeddedServer) -> None:
    silent = await connect(fast_server)
    silent_id = await silent.register("slow")
    await dispatcher(fast_server).create("r-slow", "slow")
    offer = (await silent.recv_kind("availability")).availability
    responsive = SimWorker(
        fast_server.url, API_KEY, API_SECRET, agent_name="slow", job_seconds=None
    )
    await responsive.start()
    await wait_until(lambda: offer.job.id in responsive.jobs, "the job to reach the next worker")
    state = await dispatcher(fast_server).job_state("r-slow", "slow")
    assert (state.status, state.worker_id) == (agent.JS_RUNNING, responsive.worker_id)

    late = agent.AvailabilityResponse(job_id=offer.job.id, available=True)
    await silent.send(agent.WorkerMessage(availability=late))
    await silent.ping()  # the late answer got no assignment and the connection is fine
    assert silent_id in worker_ids(fast_server)
    await silent.aclose()
    await responsive.aclose()


async def test_a_crash_while_placing_fails_the_job_instead_of_stranding_it(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong inside placement, the job still ends in one terminal status."""

    def explode(*args: object, **kwargs: object) -> str:
        raise RuntimeError("minting exploded")

    monkeypatch.setattr("callboard.server.dispatch.mint_agent_token", explode)
    client = await connect(server)
    await client.register("crash")
    await dispatcher(server).create("r-crash", "crash")
    offer = (await client.recv_kind("availability")).availability
    answer = agent.AvailabilityResponse(job_id=offer.job.id, available=True)
    await client.send(agent.WorkerMessage(availability=answer))
    state = await dispatcher(server).wait_job_status("r-crash", "crash", agent.JS_FAILED)
    assert "internal error while placing the job" in state.error
    assert "minting exploded" in state.error
    await client.ping()  # no assignment came, and the worker's connection is fine
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "job placement failed"
    ]
    await client.aclose()


async def test_terminate_answer_ends_the_job_without_assignment(server: EmbeddedServer) -> None:
    client = await connect(server)
    await client.register("term")
    await dispatcher(server).create("r-term", "term")
    offer = (await client.recv_kind("availability")).availability
    answer = agent.AvailabilityResponse(job_id=offer.job.id, terminate=True)
    await client.send(agent.WorkerMessage(availability=answer))
    await client.ping()  # the next frame is the pong: no JobAssignment
    state = await dispatcher(server).wait_job_status("r-term", "term", agent.JS_SUCCESS)
    assert state.participant_identity == ""
    await client.aclose()


async def test_assignment_token_is_a_verifiable_agent_join_token(server: EmbeddedServer) -> None:
    client = await connect(server)
    await client.register("tok")
    await dispatcher(server).create("r-tok", "tok")
    assignment = await take_job(
        client,
        participant_identity="agent-ident",
        participant_name="Agent Name",
        participant_metadata='{"lang": "es"}',
        participant_attributes={"team": "blue"},
    )
    assert assignment.url == ""
    claims = api.TokenVerifier(API_KEY, API_SECRET).verify(assignment.token)
    assert claims.identity == "agent-ident"
    assert claims.name == "Agent Name"
    assert claims.metadata == '{"lang": "es"}'
    assert claims.attributes == {"team": "blue", "lk.agent_name": "tok"}
    assert claims.kind == "agent"
    assert claims.video is not None
    assert claims.video.room_join and claims.video.agent
    assert claims.video.room == "r-tok"
    raw = jwt.decode(assignment.token, options={"verify_signature": False})
    assert raw["iss"] == API_KEY and raw["sub"] == "agent-ident"
    assert raw["exp"] - raw["nbf"] == pytest.approx(AGENT_TOKEN_TTL_S, abs=2)
    state = await dispatcher(server).job_state("r-tok", "tok")
    assert state.participant_identity == "agent-ident"
    await client.aclose()


async def test_assignment_identity_defaults_to_agent_job_id(server: EmbeddedServer) -> None:
    client = await connect(server)
    await client.register("anon")
    await dispatcher(server).create("r-anon", "anon")
    assignment = await take_job(client)
    claims = api.TokenVerifier(API_KEY, API_SECRET).verify(assignment.token)
    assert claims.identity == f"agent-{assignment.job.id}"
    await client.aclose()


# -- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_closes_worker_connections_with_going_away() -> None:
    """Regression: shutdown waited out aiohttp's shutdown timeout (10 s) per open /agent
    connection; now every worker is told 1001 "server shutting down" and it stops at once."""
    server = EmbeddedServer(ServerConfig(port=0))
    await server.start()
    registered, unregistered = await connect(server), await connect(server)
    await registered.register()
    loop = asyncio.get_running_loop()
    started = loop.time()
    closing = asyncio.create_task(server.aclose())
    for client in (registered, unregistered):
        assert await client.expect_closed() == (WSCloseCode.GOING_AWAY, "server shutting down")
    await asyncio.wait_for(closing, timeout=2.0)
    assert loop.time() - started < 2.0
    assert server.engine.workers == []


async def test_registered_permissions_shape_the_assignment_token(server: EmbeddedServer) -> None:
    client = await connect(server)
    perms = models.ParticipantPermission(
        can_subscribe=True,
        can_publish=True,
        can_publish_data=False,
        hidden=True,
        can_publish_sources=[models.MICROPHONE, models.SCREEN_SHARE_AUDIO],
    )
    req = agent.RegisterWorkerRequest(agent_name="perms", allowed_permissions=perms)
    await client.send(agent.WorkerMessage(register=req))
    await client.recv_kind("register")
    await dispatcher(server).create("r-perms", "perms")
    assignment = await take_job(client)
    video = api.TokenVerifier(API_KEY, API_SECRET).verify(assignment.token).video
    assert video is not None
    assert (video.can_subscribe, video.can_publish, video.can_publish_data, video.hidden) == (
        True,
        True,
        False,
        True,
    )
    assert video.can_publish_sources == ["microphone", "screen_share_audio"]
    await client.aclose()
