"""The worker's /agent link: its token, the register message, status updates, reconnection
after a cut (with MigrateJobRequest for running jobs, for an accepted job whose assignment the
cut lost, and for an ended job whose final status it lost) and after a server restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import pytest
from aiohttp import web
from livekit import api
from livekit.protocol import agent, models

from callboard import JobExecutorType, WorkerPermissions, WorkerType
from callboard.server.app import EmbeddedServer
from callboard.server.config import ServerConfig
from callboard.server.workers import WorkerSession
from callboard.version import __version__
from callboard.worker.connection import backoff_s
from callboard.worker.errors import ConnectionGiveUp
from callboard.worker.worker import Worker, WorkerState
from tests.worker.agents.jobs import script
from tests.worker.fake_server import FAKE_WORKER_ID, FakeAgentServer
from tests.worker.support import (
    DEADLINE_S,
    ENDED,
    EXECUTORS,
    GatedExecutor,
    control,
    fast_options,
    no_leftover_children,
    records_with,
    running_worker,
    server_worker,
    wait_until,
)

NAMED = "operator"
RECONNECT_S = 2.0
"""A cut is followed by an immediate reconnect (backoff 0 on the first attempt)."""
STATUS_INTERVAL_S = 0.2


# -- what goes on the wire -----------------------------------------------------------------


async def test_token_is_accepted_by_livekit_and_has_the_agent_grant(
    fake: FakeAgentServer,
) -> None:
    opts = fast_options(fake, key="key1", secret="s" * 40)
    async with running_worker(opts):
        (auth,) = fake.authorizations
        assert auth.startswith("Bearer ")
        assert fake.query_tokens == [""], "the token travels in the header only"
        claims = api.TokenVerifier("key1", "s" * 40).verify(auth.removeprefix("Bearer "))
        assert claims.video is not None and claims.video.agent is True
        with pytest.raises(Exception):  # noqa: B017 (any verification error)
            api.TokenVerifier("key1", "another secret, forty characters long...").verify(
                auth.removeprefix("Bearer ")
            )


async def test_register_message_field_by_field(fake: FakeAgentServer) -> None:
    perms = WorkerPermissions(
        can_publish=False,
        can_subscribe=True,
        can_publish_data=False,
        can_update_metadata=False,
        can_publish_sources=[models.TrackSource.MICROPHONE],
        hidden=True,
    )
    opts = fast_options(
        fake,
        agent_name="front-desk",
        worker_type=WorkerType.PUBLISHER,
        permissions=perms,
        namespace="ns1",
    )
    async with running_worker(opts) as worker:
        assert worker.id == FAKE_WORKER_ID
        first = fake.received[0]
        assert first.kind == "register"
        reg = first.msg.register
        assert reg.type == agent.JT_PUBLISHER
        assert reg.agent_name == "front-desk"
        assert reg.version == __version__
        assert reg.namespace == "ns1"
        assert reg.allowed_permissions == models.ParticipantPermission(
            can_publish=False,
            can_subscribe=True,
            can_publish_data=False,
            can_update_metadata=False,
            can_publish_sources=[models.TrackSource.MICROPHONE],
            hidden=True,
            agent=True,
        )
        # the first status follows the registration at once
        status = (await fake.next("update_worker")).msg.update_worker
        assert status.status == agent.WS_AVAILABLE
        assert status.load == 0.0 and status.job_count == 0


async def test_status_is_sent_every_status_interval(fake: FakeAgentServer) -> None:
    opts = fast_options(fake, status_interval=STATUS_INTERVAL_S)
    async with running_worker(opts):
        loop = asyncio.get_running_loop()
        start = loop.time()
        await wait_until(lambda: len(fake.of_kind("update_worker")) >= 6, "six status updates")
        updates = fake.of_kind("update_worker")
        gaps = [b.at - a.at for a, b in itertools.pairwise(updates)]
        assert max(gaps) < STATUS_INTERVAL_S * 2, gaps
        assert loop.time() - start < 6 * STATUS_INTERVAL_S * 2
        for u in updates:
            s = u.msg.update_worker
            assert s.status == agent.WS_AVAILABLE and s.load == 0.0 and s.job_count == 0


async def test_status_is_sent_at_once_on_change(fake: FakeAgentServer) -> None:
    """With a long status interval, FULL and AVAILABLE still reach the server at once."""
    opts = fast_options(fake, status_interval=30.0, max_jobs=1)
    async with running_worker(opts) as worker:
        await fake.next("update_worker")
        await wait_until(lambda: worker.state == WorkerState.AVAILABLE, "available")
        job = agent.Job(id="AJ_fakejob0001", room=models.Room(name="r"), metadata=script())
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await fake.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
        full = await fake.next("update_worker", lambda m: m.update_worker.status == agent.WS_FULL)
        assert full.at - asked < 1.0
        await fake.next("availability")
        await fake.send(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token="t")))
        await fake.next("update_job", lambda m: m.update_job.status == agent.JS_RUNNING)
        running = await fake.next("update_worker", lambda m: m.update_worker.job_count == 1)
        assert running.msg.update_worker.status == agent.WS_FULL
        ended = loop.time()
        await fake.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job.id)))
        free = await fake.next(
            "update_worker", lambda m: m.update_worker.status == agent.WS_AVAILABLE
        )
        assert free.at - ended < 1.0
        assert free.msg.update_worker.job_count == 0


async def test_wrong_secret_gives_up_at_once_with_a_hint(server: EmbeddedServer) -> None:
    opts = fast_options(server, api_secret="not-the-secret")
    worker = Worker(opts)
    with pytest.raises(ConnectionGiveUp, match="api_key/api_secret"):
        await asyncio.wait_for(worker.run(), 10.0)
    assert worker.state == WorkerState.STOPPED


# -- reconnection --------------------------------------------------------------------------


def server_side_ws(session: WorkerSession) -> web.WebSocketResponse:
    """The server's end of a worker's connection (held by the session's `send`)."""
    for cell in getattr(session.send, "__closure__", None) or ():
        if isinstance(cell.cell_contents, web.WebSocketResponse):
            return cell.cell_contents
    raise AssertionError("cannot find the server-side websocket of the session")


CUTS = ["worker-cut", "server-close", "server-abort"]


async def cut(how: str, server: EmbeddedServer, worker: Worker) -> None:
    if how == "worker-cut":
        worker._conn.cut()
        return
    ws = server_side_ws(server_worker(server, worker.id))
    if how == "server-close":
        await ws.close()
    else:
        transport = ws._req.transport if ws._req is not None else None
        assert transport is not None
        transport.abort()


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("executor", EXECUTORS)
async def test_cut_connection_reconnects_and_migrates_the_running_job(
    server: EmbeddedServer, executor: JobExecutorType, how: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    opts = fast_options(server, executor, agent_name=NAMED)
    async with no_leftover_children(), control(server) as ctl, running_worker(opts) as worker:
        await ctl.dispatch("call", NAMED, script(until=str(release)))
        job = await ctl.wait_status("call", agent.JS_RUNNING, agent_name=NAMED)
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run on the worker")
        old_id = worker.id
        assert job.state.worker_id == old_id

        await cut(how, server, worker)
        await wait_until(
            lambda: worker.registered and worker.id != old_id, "a new registration", RECONNECT_S
        )
        new_id = worker.id
        assert old_id not in {s.id for s in server.engine.workers}

        # the server re-attached the job to the new worker id (MigrateJobRequest)
        def migrated() -> bool:
            rec = server.engine.job(job.id)
            return rec is not None and rec.worker is not None and rec.worker.id == new_id

        await wait_until(migrated, "the job to be migrated to the new worker id", 2.0)
        listed = await ctl.job("call", NAMED)
        assert listed.state.status == agent.JS_RUNNING
        assert listed.state.worker_id == new_id
        assert len(worker.active_jobs) == 1

        # the job survived the cut, and its final status reaches the server
        release.touch()
        done = await ctl.wait_status("call", agent.JS_SUCCESS, agent_name=NAMED)
        assert done.state.worker_id == new_id and done.state.error == ""


async def test_a_job_still_launching_during_a_cut_is_migrated_too(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """Assigned, not yet running (a process still being forked): the server counts it as
    this worker's, so the MigrateJobRequest after the reconnect must name it."""
    release = tmp_path / "release"
    gated = GatedExecutor()
    opts = fast_options(server, agent_name=NAMED)
    async with control(server) as ctl, running_worker(opts, executor=gated) as worker:
        await ctl.dispatch("slow-start", NAMED, script(until=str(release)))
        await asyncio.wait_for(gated.launching.wait(), 5.0)
        job = await ctl.job("slow-start", NAMED)
        old_id = worker.id
        worker._conn.cut()
        await wait_until(
            lambda: worker.registered and worker.id != old_id, "a new registration", RECONNECT_S
        )

        def migrated() -> bool:
            rec = server.engine.job(job.id)
            return rec is not None and rec.worker is not None and rec.worker.id == worker.id

        await wait_until(migrated, "the launching job to be migrated", 2.0)
        gated.gate.set()
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to start")
        release.touch()
        done = await ctl.wait_status("slow-start", agent.JS_SUCCESS, agent_name=NAMED)
        assert done.state.worker_id == worker.id


def lose_the_next_assignment(server: EmbeddedServer, worker: Worker) -> asyncio.Event:
    """Cut `worker`'s connection at the moment the server sends it a JobAssignment: the server
    counts the assignment as sent, the worker never gets it (the soak's accept-then-cut race)."""
    session = server_worker(server, worker.id)
    ws, send = server_side_ws(session), session.send
    lost = asyncio.Event()

    async def send_or_cut(msg: agent.ServerMessage) -> None:
        if msg.WhichOneof("message") != "assignment" or lost.is_set():
            await send(msg)
            return
        lost.set()
        assert ws._req is not None and ws._req.transport is not None
        ws._req.transport.abort()

    session.send = send_or_cut
    return lost


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_an_assignment_lost_in_a_cut_is_claimed_and_the_job_runs_at_once(
    server: EmbeddedServer,
    executor: JobExecutorType,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker accepted, the cut took the assignment: the next session claims the accepted
    job, the server sends the assignment again and the call is served, long before the 15 s
    a claimless job would wait."""
    caplog.set_level(logging.INFO, logger="callboard")
    release = tmp_path / "release"
    opts = fast_options(server, executor, agent_name=NAMED)
    async with no_leftover_children(), control(server) as ctl, running_worker(opts) as worker:
        old_id = worker.id
        lost = lose_the_next_assignment(server, worker)
        started = asyncio.get_running_loop().time()
        await ctl.dispatch("lost-assignment", NAMED, script(until=str(release)))
        await asyncio.wait_for(lost.wait(), DEADLINE_S)

        job = await ctl.wait_status("lost-assignment", agent.JS_RUNNING, agent_name=NAMED)
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run", RECONNECT_S)
        assert asyncio.get_running_loop().time() - started < RECONNECT_S
        assert worker.id != old_id
        assert server_worker(server, worker.id).jobs == {job.id}
        assert records_with(caplog.records, "connection lost after accepting the job")
        assert records_with(caplog.records, "job assignment sent again after a reconnect")
        assert not records_with(caplog.records, "offer withdrawn before assignment")

        release.touch()
        done = await ctl.wait_status("lost-assignment", agent.JS_SUCCESS, agent_name=NAMED)
        assert (done.state.worker_id, done.state.error) == (worker.id, "")


def lose_the_next_final_status(worker: Worker) -> asyncio.Event:
    """Cut `worker`'s connection at the moment it sends a job's final status: the worker counts
    the status as sent, the server never gets it."""
    ws = worker._conn._ws
    assert ws is not None
    send = ws.send_bytes
    lost = asyncio.Event()

    async def send_or_cut(data: bytes, compress: int | None = None) -> None:
        msg = agent.WorkerMessage.FromString(data)
        final = msg.WhichOneof("message") == "update_job" and msg.update_job.status in ENDED
        if not final or lost.is_set():
            await send(data, compress)
            return
        lost.set()
        assert ws._response.connection is not None
        transport = ws._response.connection.transport
        assert transport is not None
        transport.abort()

    ws.send_bytes = send_or_cut  # type: ignore[method-assign]
    return lost


async def test_a_final_status_lost_in_a_cut_is_sent_again_after_the_reconnect(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """The job ended, its JS_SUCCESS went into the socket and the cut took it: the next session
    claims the job and sends the status again, instead of the server failing the job when
    its 15 s grace runs out."""
    release = tmp_path / "release"
    opts = fast_options(server, agent_name=NAMED)
    async with control(server) as ctl, running_worker(opts) as worker:
        await ctl.dispatch("lost-status", NAMED, script(until=str(release)))
        await ctl.wait_status("lost-status", agent.JS_RUNNING, agent_name=NAMED)
        old_id = worker.id
        lost = lose_the_next_final_status(worker)
        release.touch()
        await asyncio.wait_for(lost.wait(), DEADLINE_S)
        done = await ctl.wait_status(
            "lost-status", agent.JS_SUCCESS, agent_name=NAMED, timeout=RECONNECT_S
        )
        assert done.state.worker_id == worker.id != old_id and done.state.error == ""
        # the WorkerPing sent after it came back: the server has it, nothing is kept to resend
        await wait_until(lambda: not worker.running.unconfirmed_ends(), "the server's receipt")


async def assign(fake: FakeAgentServer, job: agent.Job) -> None:
    await fake.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
    await fake.next("availability")
    await fake.send(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token="t")))


async def test_migrate_job_request_names_the_running_jobs(
    fake: FakeAgentServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard")
    opts = fast_options(fake)
    async with running_worker(opts) as worker:
        job = agent.Job(id="AJ_migrating01", room=models.Room(name="r"), metadata=script())
        await assign(fake, job)
        await fake.next("update_job", lambda m: m.update_job.status == agent.JS_RUNNING)
        worker._conn.cut()
        await wait_until(lambda: fake.connections == 2, "a second connection", RECONNECT_S)
        await fake.next("register")
        second = await fake.next("register")
        migrate = await fake.next("migrate_job")
        assert list(migrate.msg.migrate_job.job_ids) == [job.id]
        assert second.at <= migrate.at
        kinds = [r.kind for r in fake.received if r.at >= second.at]
        assert kinds[:3] == ["register", "migrate_job", "update_worker"], kinds
        status = (await fake.next("update_worker", lambda m: m.update_worker.job_count == 1)).msg
        assert status.update_worker.job_count == 1

        # The server cannot tell a lost assignment from a lost JS_RUNNING, so it may send a
        # claimed job's assignment again: the job runs once and nothing more is reported.
        await fake.send(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token="t")))
        await wait_until(
            lambda: bool(records_with(caplog.records, "assignment sent again")), "the duplicate"
        )
        assert len(worker.active_jobs) == 1
        assert [r.msg.update_job.status for r in fake.of_kind("update_job")] == [agent.JS_RUNNING]


CLOSE_S = 1.5


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_the_outcome_goes_out_before_the_job_has_closed(
    fake: FakeAgentServer, executor: JobExecutorType
) -> None:
    """livekit-server fails a job whose agent leaves the room before its status arrives ("agent
    worker left the room"), so the worker reports the outcome as soon as the job knows it. The
    job keeps its place until its close is over (a slow shutdown callback here), and a
    reconnect meanwhile does not migrate it: the server has its end (it answered the
    WorkerPing sent after it)."""
    async with running_worker(fast_options(fake, executor)) as worker:
        job = agent.Job(
            id="AJ_closing0001",
            room=models.Room(name="r"),
            metadata=script(sleep=0, close_s=CLOSE_S),
        )
        await assign(fake, job)
        await fake.next("update_job", lambda m: m.update_job.status == agent.JS_RUNNING)
        # the job returns at once; its close then takes CLOSE_S
        ended = await fake.next("update_job", lambda m: m.update_job.job_id == job.id)
        assert ended.msg.update_job.status == agent.JS_SUCCESS
        assert [j.info.job.id for j in worker.active_jobs] == [job.id], "still closing"
        await wait_until(lambda: not worker.running.unconfirmed_ends(), "the server's receipt")

        worker._conn.cut()
        await wait_until(lambda: fake.connections == 2, "a second connection", RECONNECT_S)
        await fake.next("register")
        second = await fake.next("register")
        await fake.next("update_worker", lambda m: True)
        assert worker.active_jobs, "the job is still closing after the reconnect"
        assert "migrate_job" not in [r.kind for r in fake.received if r.at >= second.at]

        await wait_until(lambda: not worker.active_jobs, "the job to close", CLOSE_S + 5)
        assert [r.msg.update_job.status for r in fake.received if r.kind == "update_job"] == [
            agent.JS_RUNNING,
            agent.JS_SUCCESS,
        ], "one final status"


async def test_a_job_that_dies_while_closing_keeps_the_outcome_it_reported(
    fake: FakeAgentServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Its call ended well and the server has that; the process dying in a shutdown callback
    afterwards is the worker's to log, with both statuses and the job's ids."""
    async with running_worker(fast_options(fake, JobExecutorType.PROCESS)) as worker:
        job = agent.Job(
            id="AJ_closing0002",
            room=models.Room(name="r"),
            metadata=script(sleep=0, die_closing=True),
        )
        await assign(fake, job)
        ended = await fake.next(
            "update_job", lambda m: m.update_job.status not in (agent.JS_PENDING, agent.JS_RUNNING)
        )
        assert ended.msg.update_job.status == agent.JS_SUCCESS
        await wait_until(lambda: not worker.active_jobs, "the process to die", 10.0)
    statuses = [r.msg.update_job.status for r in fake.received if r.kind == "update_job"]
    assert statuses == [agent.JS_RUNNING, agent.JS_SUCCESS]
    (record,) = [r for r in caplog.records if "failed while closing" in r.getMessage()]
    assert record.__dict__["job_id"] == job.id
    assert record.__dict__["reported"] == "JS_SUCCESS"
    assert record.__dict__["status"] == "JS_FAILED"
    assert "SIGKILL" in record.__dict__["error"]


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_server_restart_on_the_same_port_worker_reregisters(
    executor: JobExecutorType, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    first = EmbeddedServer(ServerConfig(port=0))
    await first.start()
    port = first.port
    second: EmbeddedServer | None = None
    try:
        opts = fast_options(first, executor, agent_name=NAMED)
        async with no_leftover_children(), running_worker(opts) as worker:
            async with control(first) as ctl:
                await ctl.dispatch("before", NAMED, script(until=str(release)))
                await ctl.wait_status("before", agent.JS_RUNNING, agent_name=NAMED)
            old_id = worker.id
            await first.aclose()
            await wait_until(lambda: not worker.registered, "the worker to notice", 2.0)
            second = EmbeddedServer(ServerConfig(port=port))
            await second.start()
            restarted = asyncio.get_running_loop().time()
            await wait_until(
                lambda: worker.registered and worker.id != old_id,
                "re-registration on the restarted server",
                backoff_s(1) + 1.5,
            )
            session = server_worker(second, worker.id)
            await wait_until(lambda: session.job_count == 1, "the job count to be reported", 2.0)
            assert len(worker.active_jobs) == 1, "the running job survives the restart"
            assert asyncio.get_running_loop().time() - restarted < backoff_s(1) + 1.5

            # and the worker takes new jobs from the new server
            async with control(second) as ctl:
                await ctl.dispatch("after", NAMED, script(sleep=0.05))
                done = await ctl.wait_status("after", agent.JS_SUCCESS, agent_name=NAMED)
                assert done.state.worker_id == worker.id
            release.touch()
            await wait_until(lambda: not worker.active_jobs, "the old job to end")
    finally:
        await first.aclose()
        if second is not None:
            await second.aclose()


async def test_a_job_that_ends_while_disconnected_still_reports_its_end(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its final status waits in the queue; the MigrateJobRequest after the reconnect names the
    job, so the server takes that status from the new worker id instead of failing the job."""
    monkeypatch.setattr("callboard.worker.connection.backoff_s", lambda attempt: 0.5)
    release = tmp_path / "release"
    opts = fast_options(server, agent_name=NAMED)
    async with control(server) as ctl, running_worker(opts) as worker:
        await ctl.dispatch("ends-offline", NAMED, script(until=str(release)))
        await ctl.wait_status("ends-offline", agent.JS_RUNNING, agent_name=NAMED)
        await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run")
        old_id = worker.id
        worker._conn.cut()
        await wait_until(lambda: not worker.registered, "the cut")
        release.touch()
        await wait_until(lambda: not worker.active_jobs, "the job to end while offline")
        assert not worker.registered, "the job must end before the reconnect for this test"
        await wait_until(
            lambda: worker.registered and worker.id != old_id, "a new registration", 3.0
        )
        done = await ctl.wait_status("ends-offline", agent.JS_SUCCESS, agent_name=NAMED)
        assert done.state.worker_id == worker.id and done.state.error == ""


async def test_a_malformed_server_frame_does_not_kill_the_connection(
    fake: FakeAgentServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_worker(fast_options(fake)) as worker:
        assert fake._ws is not None
        await fake._ws.send_bytes(b"\xff\xff\xff\xff not a protobuf")
        job = agent.Job(id="AJ_afterbadframe", room=models.Room(name="r"), metadata=script())
        await asyncio.sleep(0.1)
        if not worker.registered or fake.connections > 1:
            await wait_until(lambda: worker.registered, "the worker to reconnect", RECONNECT_S)
        await fake.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
        answer = (await fake.next("availability")).msg.availability
        assert answer.job_id == job.id and answer.available
        assert any("malformed" in r.getMessage() for r in caplog.records)
