"""One offer, from AvailabilityRequest to a running job or a refusal: what request_fnc decides
reaches the server field by field; a raising or hanging request_fnc costs one rejected job,
logged with its id, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from livekit.protocol import agent, models

from callboard import JobRequest, Worker
from callboard.server.app import EmbeddedServer
from callboard.worker.worker import WorkerState
from tests.worker.agents.jobs import script
from tests.worker.fake_server import FakeAgentServer
from tests.worker.support import (
    control,
    fast_options,
    records_with,
    running_worker,
    wait_until,
)

ANSWER_TIMEOUT_S = 0.4


def offer(job: agent.Job) -> agent.ServerMessage:
    return agent.ServerMessage(availability=agent.AvailabilityRequest(job=job))


def assign(job: agent.Job, token: str = "job-token") -> agent.ServerMessage:
    return agent.ServerMessage(assignment=agent.JobAssignment(job=job, token=token))


def fake_job(job_id: str, **what: object) -> agent.Job:
    return agent.Job(
        id=job_id,
        type=agent.JT_ROOM,
        room=models.Room(name=f"room-{job_id}"),
        metadata=script(**what),
    )


async def test_accept_arguments_and_job_statuses_field_by_field(fake: FakeAgentServer) -> None:
    async def request_fnc(req: JobRequest) -> None:
        await req.accept(
            identity="agent-front-desk",
            name="Front Desk",
            metadata='{"language": "es"}',
            attributes={"team": "support", "tier": "1"},
        )

    async with running_worker(fast_options(fake, request_fnc=request_fnc)):
        job = fake_job("AJ_fieldbyfield", sleep=0.1)
        await fake.send(offer(job))
        answer = (await fake.next("availability")).msg.availability
        assert answer == agent.AvailabilityResponse(
            job_id=job.id,
            available=True,
            participant_identity="agent-front-desk",
            participant_name="Front Desk",
            participant_metadata='{"language": "es"}',
            participant_attributes={"team": "support", "tier": "1"},
        )
        await fake.send(assign(job))
        running = (await fake.next("update_job")).msg.update_job
        assert running == agent.UpdateJobStatus(job_id=job.id, status=agent.JS_RUNNING)
        ended = (await fake.next("update_job")).msg.update_job
        assert ended == agent.UpdateJobStatus(job_id=job.id, status=agent.JS_SUCCESS, error="")
        await asyncio.sleep(0.3)
        assert len(fake.of_kind("update_job")) == 2, "exactly one terminal status"


async def test_default_accept_identity_and_a_failing_entrypoint(fake: FakeAgentServer) -> None:
    async with running_worker(fast_options(fake)):
        job = fake_job("AJ_defaultaccept", **{"raise": "agent bug"})
        await fake.send(offer(job))
        answer = (await fake.next("availability")).msg.availability
        assert answer.available and answer.participant_identity == f"agent-{job.id}"
        assert answer.participant_name == "" and not answer.terminate
        await fake.send(assign(job))
        await fake.next("update_job", lambda m: m.update_job.status == agent.JS_RUNNING)
        ended = (await fake.next("update_job")).msg.update_job
        assert ended.status == agent.JS_FAILED
        assert "agent bug" in ended.error


async def test_reject_and_reject_with_terminate(fake: FakeAgentServer) -> None:
    async def request_fnc(req: JobRequest) -> None:
        await req.reject(terminate=req.id.endswith("T"))

    async with running_worker(fast_options(fake, request_fnc=request_fnc)) as worker:
        await fake.send(offer(fake_job("AJ_rejectplain")))
        plain = (await fake.next("availability")).msg.availability
        assert plain == agent.AvailabilityResponse(job_id="AJ_rejectplain", available=False)
        await fake.send(offer(fake_job("AJ_rejectterm_T")))
        term = (await fake.next("availability")).msg.availability
        assert term == agent.AvailabilityResponse(
            job_id="AJ_rejectterm_T", available=False, terminate=True
        )
        assert not worker.active_jobs


async def test_assignment_for_a_job_never_accepted_is_reported_failed(
    fake: FakeAgentServer,
) -> None:
    async with running_worker(fast_options(fake)) as worker:
        job = fake_job("AJ_neveroffered")
        await fake.send(assign(job))
        update = (await fake.next("update_job")).msg.update_job
        assert update.job_id == job.id and update.status == agent.JS_FAILED
        assert update.error
        assert not worker.active_jobs


async def test_a_duplicate_offer_is_refused(fake: FakeAgentServer) -> None:
    async with running_worker(fast_options(fake)) as worker:
        job = fake_job("AJ_duplicated01")
        await fake.send(offer(job))
        assert (await fake.next("availability")).msg.availability.available
        await fake.send(assign(job))
        await fake.next("update_job", lambda m: m.update_job.status == agent.JS_RUNNING)
        await fake.send(offer(job))
        again = (await fake.next("availability")).msg.availability
        assert again.job_id == job.id and not again.available
        assert len(worker.active_jobs) == 1


async def test_no_assignment_in_time_frees_the_slot(fake: FakeAgentServer) -> None:
    opts = fast_options(fake, assignment_timeout=0.3, max_jobs=1)
    async with running_worker(opts) as worker:
        await fake.send(offer(fake_job("AJ_unassigned01")))
        assert (await fake.next("availability")).msg.availability.available
        await wait_until(lambda: worker.state == WorkerState.FULL, "FULL while the offer is open")
        await wait_until(lambda: worker.state == WorkerState.AVAILABLE, "the slot back", 2.0)
        await fake.send(offer(fake_job("AJ_afterwards01")))
        assert (await fake.next("availability")).msg.availability.available


@pytest.mark.parametrize("behaviour", ["raises", "hangs"])
async def test_request_fnc_that_fails_rejects_in_time_and_the_worker_takes_the_next_job(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture, behaviour: str
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    seen: list[str] = []

    async def request_fnc(req: JobRequest) -> None:
        seen.append(req.id)
        if len(seen) == 1:
            if behaviour == "raises":
                raise RuntimeError("request_fnc bug")
            await asyncio.Event().wait()
        await req.accept()

    opts = fast_options(server, request_fnc=request_fnc, availability_timeout=ANSWER_TIMEOUT_S)
    async with control(server) as ctl, running_worker(opts) as worker:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await ctl.create_room("first")
        refused = await ctl.wait_status("first", agent.JS_FAILED)
        assert loop.time() - asked < ANSWER_TIMEOUT_S + 1.0
        assert refused.state.reason == agent.JSR_NO_CAPACITY and refused.state.error
        expected = "request_fnc failed" if behaviour == "raises" else "request_fnc did not answer"
        (logged,) = records_with(caplog.records, expected)
        assert logged.job_id == refused.id  # type: ignore[attr-defined]
        assert logged.levelno >= logging.WARNING
        if behaviour == "raises":
            assert logged.exc_info is not None
        else:
            assert logged.timeout_s == ANSWER_TIMEOUT_S  # type: ignore[attr-defined]

        # the worker is still healthy and takes the next job
        assert worker.registered and worker.state == WorkerState.AVAILABLE
        await ctl.create_room("second")
        taken = await ctl.wait_status("second", agent.JS_RUNNING)
        assert taken.state.worker_id == worker.id
        assert seen == [refused.id, taken.id]


async def test_an_answer_from_a_previous_connection_is_not_sent(
    fake: FakeAgentServer, caplog: pytest.LogCaptureFixture
) -> None:
    """request_fnc still deciding when the connection drops: the offer died with that session;
    its late answer must not reach the new one (the new session never offered that job)."""
    caplog.set_level(logging.INFO, logger="callboard")
    decide = asyncio.Event()

    async def request_fnc(req: JobRequest) -> None:
        await decide.wait()
        await req.accept()

    opts = fast_options(fake, request_fnc=request_fnc, availability_timeout=5.0)
    async with running_worker(opts) as worker:
        await fake.send(offer(fake_job("AJ_stalesession")))
        await wait_until(lambda: len(worker._offers) == 1, "the offer to be pending")
        worker._conn.cut()
        await wait_until(lambda: fake.connections == 2 and worker.registered, "reconnect", 2.0)
        decide.set()
        await wait_until(lambda: not worker._offers, "the offer to be over")
        await asyncio.sleep(0.1)
        assert fake.of_kind("availability") == []
        assert records_with(caplog.records, "offer from a previous connection")


async def test_an_accept_still_queued_at_a_cut_is_withdrawn_not_claimed(
    fake: FakeAgentServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The accept never left: the server cannot have assigned the job, so the offer ends at the
    cut (its slot freed) and the next session neither sends that accept nor claims the job.
    An accept that did leave is held and claimed instead (tests/worker/test_connection.py)."""
    caplog.set_level(logging.INFO, logger="callboard")
    async with running_worker(fast_options(fake, availability_timeout=5.0)) as worker:
        ws = worker._conn._ws
        assert ws is not None
        send = ws.send_bytes

        async def stall_answers(data: bytes, compress: int | None = None) -> None:
            if agent.WorkerMessage.FromString(data).WhichOneof("message") == "availability":
                await asyncio.Event().wait()
            await send(data, compress)

        ws.send_bytes = stall_answers  # type: ignore[method-assign]
        await fake.send(offer(fake_job("AJ_queuedaccept1")))
        await wait_until(
            lambda: any(m.HasField("availability") for m in worker._conn.pending()),
            "the accept to be queued",
        )
        worker._conn.cut()
        await wait_until(lambda: fake.connections == 2 and worker.registered, "reconnect", 2.0)
        await wait_until(lambda: not worker._offers, "the offer to be over")
        assert records_with(caplog.records, "offer withdrawn before assignment")
        await fake.next("update_worker", lambda m: m.update_worker.job_count == 0)
        assert fake.of_kind("availability") == [] and fake.of_kind("migrate_job") == []


async def test_stopping_refuses_an_offer_still_being_decided(fake: FakeAgentServer) -> None:
    """A worker that stops while request_fnc deliberates answers "not available" at once, so
    the server can offer the job elsewhere instead of waiting out its timeout."""

    async def request_fnc(req: JobRequest) -> None:
        await asyncio.Event().wait()

    opts = fast_options(fake, request_fnc=request_fnc, availability_timeout=30.0)
    worker = Worker(opts)
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.registered, "the worker to register")
        await fake.send(offer(fake_job("AJ_openoffer001")))
        await wait_until(lambda: len(worker._offers) == 1, "the offer to be open")
        worker.request_shutdown(fast=True)
        answer = (await fake.next("availability", timeout=2.0)).msg.availability
        assert answer == agent.AvailabilityResponse(job_id="AJ_openoffer001", available=False)
    finally:
        worker.request_shutdown(fast=True)
        await asyncio.wait_for(run, 10.0)
