"""Dispatch engine: turns a dispatch into a job, places it on a worker, follows it to its end.

Placement follows livekit-server: candidates are AVAILABLE workers of the job's agent name,
namespace and type, picked at random weighted by free capacity; the chosen one gets an
AvailabilityRequest; `available=false` moves on to the next candidate, `terminate=true` ends the
job, an accept gets a JobAssignment with a freshly minted token. Unlike livekit-server, a worker
that does not answer in time is skipped rather than failing the job, and a job that finds no
worker is recorded as failed (JSR_NO_CAPACITY) instead of vanishing.

A worker that disconnects keeps its jobs for `migration_grace`, for the MigrateJobRequest of its
next session (livekit-server ignores that request and leaves the jobs listed as running). A job
it never confirmed (no UpdateJobStatus yet) may have lost its assignment in the cut: a claim
gets the assignment again, and with no claim the job is offered again (`resuming`) instead of
failed. A confirmed job with no claim fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

from livekit.protocol import agent, agent_dispatch, models

from callboard.log import get_logger
from callboard.server.auth import AgentTokenRequest, KeyStore, mint_agent_token
from callboard.server.config import AGENT_TOKEN_TTL_S, ServerConfig
from callboard.server.ids import JOB_PREFIX, new_id
from callboard.server.workers import WorkerSession, pick_weighted

log = get_logger("server.dispatch")

AGENT_NAME_ATTRIBUTE = "lk.agent_name"
ENDED = frozenset({agent.JS_SUCCESS, agent.JS_FAILED, agent.JS_CANCELLED})


def _now_ns() -> int:
    return time.time_ns()


def _identity(rec: JobRecord, answer: agent.AvailabilityResponse) -> str:
    return answer.participant_identity or f"agent-{rec.id}"


@dataclass(eq=False)
class JobRecord:
    """A job and where it runs. `job` is the proto inside its dispatch's state (ListDispatch)."""

    job: agent.Job
    worker: WorkerSession | None = None
    place_task: asyncio.Task[None] | None = None
    migration_timer: asyncio.TimerHandle | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    api_key: str = ""
    """The key of the workers it was offered to: only they may claim it (MigrateJobRequest)."""
    answer: agent.AvailabilityResponse | None = None
    """The accept its assignment was built from, to build it again for a reconnected worker."""
    confirmed: bool = False
    """Its worker reported on it since the assignment, so the assignment arrived."""
    resumed: bool = False
    """Offered again after its worker left before confirming it (`AvailabilityRequest.resuming`)."""
    moved: bool = False
    """It left a worker that may still hold a copy (an offer lost in a cut or unanswered, an
    assignment that failed or went unconfirmed): a claim from a session other than its live
    owner's is that stale copy. A job that never moved can only be claimed by its owner's
    worker, reconnected while the server still holds the old connection open."""

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "job_id": self.job.id,
            "room": self.job.room.name,
            "dispatch_id": self.job.dispatch_id,
            "agent_name": self.job.agent_name,
        }
        if self.worker is not None:
            fields["worker_id"] = self.worker.id
        return fields


class DispatchEngine:
    """Owns the worker registry and every job from creation to its one terminal status."""

    def __init__(self, keys: KeyStore, config: ServerConfig, rng: random.Random | None = None):
        self._keys = keys
        self._config = config
        self._rng = rng or random.Random()
        self._workers: dict[str, WorkerSession] = {}
        self._jobs: dict[str, JobRecord] = {}

    # -- registry -----------------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerSession]:
        return list(self._workers.values())

    def job(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def add_worker(self, session: WorkerSession) -> None:
        self._workers[session.id] = session
        log.info(
            "worker registered",
            extra={
                **session.log_fields,
                "namespace": session.namespace,
                "job_type": agent.JobType.Name(session.job_type),
                "version": session.version,
            },
        )

    def remove_worker(self, session: WorkerSession, reason: str) -> None:
        """A worker left: its unanswered offers move on, its jobs wait for a migration."""
        session.closed = True
        self._workers.pop(session.id, None)
        for fut in session.pending.values():
            if not fut.done():
                fut.cancel()
        session.pending.clear()
        orphans = [self._jobs[j] for j in session.jobs if j in self._jobs]
        log.info(
            "worker left",
            extra={**session.log_fields, "reason": reason, "running_jobs": len(orphans)},
        )
        loop = asyncio.get_running_loop()
        for rec in orphans:
            rec.migration_timer = loop.call_later(
                self._config.migration_grace, self._migration_expired, rec, session.id
            )

    def _migration_expired(self, rec: JobRecord, worker_id: str) -> None:
        rec.migration_timer = None
        if rec.worker is None or rec.worker.id != worker_id or rec.ended.is_set():
            return
        if not rec.confirmed:
            self._replace(rec)
            return
        self._end(
            rec,
            agent.JS_FAILED,
            f"worker {worker_id} disconnected and no MigrateJobRequest came within "
            f"{self._config.migration_grace:g}s",
        )

    def _replace(self, rec: JobRecord) -> None:
        """Offer again a job whose worker left before confirming it: its assignment may never
        have arrived, and no reconnected worker claimed it."""
        assert rec.worker is not None
        lost = rec.worker
        log.warning(
            "worker left before confirming the job and no MigrateJobRequest claimed it within "
            f"{self._config.migration_grace:g}s: offering the job again",
            extra=rec.log_fields,
        )
        lost.jobs.discard(rec.id)
        rec.worker = None
        rec.answer = None
        rec.resumed = rec.moved = True
        state = rec.job.state
        state.status = agent.JS_PENDING
        state.worker_id = ""
        state.participant_identity = ""
        state.updated_at = _now_ns()
        self._start_placing(rec)

    # -- job creation and placement -----------------------------------------------------------

    def launch(
        self,
        room: models.Room,
        dispatch: agent_dispatch.AgentDispatch,
        job_type: int = agent.JT_ROOM,
        namespace: str = "",
        participant: models.ParticipantInfo | None = None,
    ) -> JobRecord:
        """Create a job for `dispatch` in `room` and start placing it; returns at once."""
        job = dispatch.state.jobs.add()
        job.id = new_id(JOB_PREFIX)
        job.dispatch_id = dispatch.id
        job.type = job_type  # type: ignore[assignment]
        job.room.CopyFrom(room)
        if participant is not None:
            job.participant.CopyFrom(participant)
        job.namespace = namespace
        job.metadata = dispatch.metadata
        job.agent_name = dispatch.agent_name
        job.attributes.update(dispatch.attributes)
        job.state.status = agent.JS_PENDING
        job.state.updated_at = _now_ns()
        rec = JobRecord(job)
        self._jobs[job.id] = rec
        if log.isEnabledFor(logging.INFO):
            log.info("job created", extra=rec.log_fields)
        self._start_placing(rec)
        return rec

    def _start_placing(self, rec: JobRecord) -> None:
        rec.place_task = asyncio.get_running_loop().create_task(
            self._place(rec), name=f"place-{rec.id}"
        )
        rec.place_task.add_done_callback(lambda task: self._placement_done(rec, task))

    def has_worker(self, agent_name: str, job_type: int) -> bool:
        """Whether a worker of this agent name serves `job_type` (livekit-server launches
        participant and publisher jobs only then)."""
        return any(
            w.agent_name == agent_name and w.job_type == job_type for w in self._workers.values()
        )

    def _placement_done(self, rec: JobRecord, task: asyncio.Task[None]) -> None:
        """A placement that crashed still ends its job (JS_FAILED), never leaves it pending."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("job placement failed", exc_info=error, extra=rec.log_fields)
        self._end(rec, agent.JS_FAILED, f"internal error while placing the job: {error!r}")

    async def _place(self, rec: JobRecord) -> None:
        tried: set[str] = set()
        refusals = 0
        while not rec.ended.is_set():
            worker = pick_weighted(self._workers.values(), rec.job, tried, self._rng)
            if worker is None:
                why = (
                    f"all {len(tried)} candidate worker(s) refused or did not answer"
                    if tried
                    else "no worker registered for this agent name with free capacity"
                )
                self._end(
                    rec,
                    agent.JS_FAILED,
                    f"{why} (agent_name={rec.job.agent_name!r})",
                    agent.JSR_NO_CAPACITY,
                )
                return
            tried.add(worker.id)
            answer = await self._offer(rec, worker)
            if answer is None:
                refusals += 1
                continue
            if answer.terminate:
                self._end(rec, agent.JS_SUCCESS, "", reason_text="worker answered terminate")
                return
            if not answer.available:
                log.info("job rejected", extra={**rec.log_fields, "worker_id": worker.id})
                refusals += 1
                continue
            if await self._assign(rec, worker, answer):
                return

    async def _offer(
        self, rec: JobRecord, worker: WorkerSession
    ) -> agent.AvailabilityResponse | None:
        """Send an AvailabilityRequest; the answer, or None on timeout or a lost worker."""
        fut: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
        worker.pending[rec.id] = fut
        rec.job.state.worker_id = worker.id
        rec.api_key = worker.api_key
        request = agent.AvailabilityRequest(job=rec.job, resuming=rec.resumed)
        try:
            await worker.send(agent.ServerMessage(availability=request))
            if log.isEnabledFor(logging.INFO):
                log.info("job offered", extra={**rec.log_fields, "worker_id": worker.id})
            return await asyncio.wait_for(fut, self._config.availability_timeout)
        except TimeoutError:
            log.warning(
                "worker did not answer the availability request in time, trying the next one",
                extra={
                    **rec.log_fields,
                    "worker_id": worker.id,
                    "timeout_s": self._config.availability_timeout,
                },
            )
            rec.moved = True
            return None
        except (asyncio.CancelledError, ConnectionError):
            if rec.ended.is_set() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            rec.moved = True
            return None
        finally:
            worker.pending.pop(rec.id, None)

    async def _assign(
        self, rec: JobRecord, worker: WorkerSession, answer: agent.AvailabilityResponse
    ) -> bool:
        secret = self._keys.secret_for(worker.api_key)
        if worker.closed or secret is None:
            return False
        rec.answer = answer
        now = _now_ns()
        state = rec.job.state
        state.status = agent.JS_RUNNING
        state.participant_identity = _identity(rec, answer)
        state.worker_id = worker.id
        state.started_at = now
        state.updated_at = now
        rec.worker = worker
        rec.confirmed = False
        worker.jobs.add(rec.id)
        assignment = self._assignment(rec, answer, worker, secret)
        try:
            await worker.send(agent.ServerMessage(assignment=assignment))
        except ConnectionError:
            worker.jobs.discard(rec.id)
            rec.worker = None
            rec.moved = True
            state.status = agent.JS_PENDING
            return False
        if log.isEnabledFor(logging.INFO):
            log.info(
                "job assigned",
                extra={**rec.log_fields, "participant_identity": state.participant_identity},
            )
        return True

    def _assignment(
        self,
        rec: JobRecord,
        answer: agent.AvailabilityResponse,
        worker: WorkerSession,
        secret: str,
    ) -> agent.JobAssignment:
        """The JobAssignment for `worker`, with a token minted from its accept (`answer`)."""
        attributes = dict(answer.participant_attributes)
        attributes[AGENT_NAME_ATTRIBUTE] = worker.agent_name
        perms = worker.permissions
        token = mint_agent_token(
            worker.api_key,
            secret,
            AgentTokenRequest(
                room=rec.job.room.name,
                identity=_identity(rec, answer),
                name=answer.participant_name,
                metadata=answer.participant_metadata,
                attributes=attributes,
                can_publish=perms.can_publish,
                can_subscribe=perms.can_subscribe,
                can_publish_data=perms.can_publish_data,
                can_update_metadata=perms.can_update_metadata,
                hidden=perms.hidden,
                can_publish_sources=[
                    models.TrackSource.Name(s).lower() for s in perms.can_publish_sources
                ],
            ),
            AGENT_TOKEN_TTL_S,
        )
        return agent.JobAssignment(job=rec.job, token=token)

    # -- messages from workers ----------------------------------------------------------------

    def on_availability(self, worker: WorkerSession, answer: agent.AvailabilityResponse) -> None:
        fut = worker.pending.get(answer.job_id)
        if fut is None:
            log.warning(
                "availability answer for a job not offered to this worker, ignored",
                extra={**worker.log_fields, "job_id": answer.job_id},
            )
            return
        if not fut.done():
            fut.set_result(answer)

    def on_update_job(self, worker: WorkerSession, update: agent.UpdateJobStatus) -> None:
        rec = self._jobs.get(update.job_id)
        if rec is None or rec.worker is not worker:
            log.info(
                "job update for a job this worker does not run, ignored",
                extra={
                    **worker.log_fields,
                    "job_id": update.job_id,
                    "status": agent.JobStatus.Name(update.status)
                    if update.status in agent.JobStatus.values()
                    else update.status,
                },
            )
            return
        rec.confirmed = True
        if update.status in ENDED:
            self._end(rec, update.status, update.error, reason_text="reported by worker")
            return
        state = rec.job.state
        state.updated_at = _now_ns()
        if update.status == agent.JS_RUNNING and state.status != agent.JS_RUNNING:
            state.started_at = state.updated_at
        state.status = update.status
        state.error = update.error
        if update.status == agent.JS_RUNNING and log.isEnabledFor(logging.INFO):
            log.info("job running", extra=rec.log_fields)

    async def on_migrate(self, worker: WorkerSession, req: agent.MigrateJobRequest) -> None:
        """Re-attach the jobs a reconnected worker claims to its new session; one whose
        assignment it may never have received gets that assignment again."""
        ids = list(req.job_ids) + [j.id for j in req.jobs if j.id not in req.job_ids]
        for job_id in ids:
            rec = self._jobs.get(job_id)
            if rec is None:
                # Usual after a cut: the worker claims the jobs whose final status it re-sends.
                log.info(
                    "cannot migrate a job that is unknown or ended",
                    extra={**worker.log_fields, "job_id": job_id},
                )
                continue
            if rec.api_key != worker.api_key:
                log.warning(
                    "cannot migrate a job offered under another key",
                    extra={**worker.log_fields, "job_id": job_id},
                )
                continue
            old = rec.worker
            if old is None and rec.answer is None:
                await self._stop_claimed_copy(rec, worker, "the job is being offered again")
                continue
            if rec.moved and old is not None and not old.closed and old is not worker:
                await self._stop_claimed_copy(rec, worker, "the job runs on another worker")
                continue
            if old is None and rec.place_task is not None:
                # Its assignment could not be sent and it is being offered again: the claimant
                # accepted it, so it takes the job rather than a worker picked afresh.
                rec.place_task.cancel()
            self._reattach(rec, worker)
            if not rec.confirmed:
                await self._reassign(rec, worker)

    def _reattach(self, rec: JobRecord, worker: WorkerSession) -> None:
        if rec.migration_timer is not None:
            rec.migration_timer.cancel()
            rec.migration_timer = None
        old, rec.worker = rec.worker, worker
        if old is not None:
            old.jobs.discard(rec.id)
        worker.jobs.add(rec.id)
        state = rec.job.state
        state.updated_at = _now_ns()
        if state.status == agent.JS_PENDING:
            state.status = agent.JS_RUNNING
            state.started_at = state.updated_at
        state.worker_id = worker.id
        log.info("job migrated", extra={**rec.log_fields, "from_worker_id": old.id if old else ""})

    async def _reassign(self, rec: JobRecord, worker: WorkerSession) -> None:
        """Send the assignment again to a claimant that never confirmed the job: the first one
        may have been lost with the old connection (a worker ignores a duplicate)."""
        secret = self._keys.secret_for(worker.api_key)
        if secret is None or rec.answer is None:
            return
        rec.job.state.participant_identity = _identity(rec, rec.answer)
        assignment = self._assignment(rec, rec.answer, worker, secret)
        with contextlib.suppress(ConnectionError):
            await worker.send(agent.ServerMessage(assignment=assignment))
            log.info("job assignment sent again after a reconnect", extra=rec.log_fields)

    async def _stop_claimed_copy(self, rec: JobRecord, claimant: WorkerSession, why: str) -> None:
        """Refuse a claim the server cannot honour, and tell the claimant to drop its copy (a
        job it still runs from before it was lost, or an accept still waiting), so the call
        gets one agent and the claimant's capacity is freed at once."""
        log.warning(
            f"a reconnected worker claims a job, but {why}: terminating its copy",
            extra={**rec.log_fields, "claimant_worker_id": claimant.id},
        )
        with contextlib.suppress(ConnectionError):
            await claimant.send(
                agent.ServerMessage(termination=agent.JobTermination(job_id=rec.id))
            )

    # -- termination and the end --------------------------------------------------------------

    async def terminate(self, job_id: str, why: str, reason: int, error: str = "") -> None:
        """End a job on request (DeleteDispatch, DeleteRoom, its agent left the room):
        JobTermination to its worker; JS_FAILED with `error` when one is given."""
        rec = self._jobs.get(job_id)
        if rec is None or rec.ended.is_set():
            return
        worker = rec.worker
        if worker is None:
            if rec.place_task is not None:
                rec.place_task.cancel()
            self._end(rec, agent.JS_FAILED, f"{why} before the job was assigned", reason)
            return
        if not worker.closed:
            with contextlib.suppress(ConnectionError):
                await worker.send(
                    agent.ServerMessage(termination=agent.JobTermination(job_id=job_id))
                )
        # livekit-server marks a terminated job successful without waiting for the worker,
        # failed when its agent left the room.
        status = agent.JS_FAILED if error else agent.JS_SUCCESS
        self._end(rec, status, error, reason, reason_text=why)

    def _end(
        self,
        rec: JobRecord,
        status: int,
        error: str,
        reason: int = agent.JSR_UNSPECIFIED,
        reason_text: str = "",
    ) -> None:
        if rec.ended.is_set():
            return
        now = _now_ns()
        state = rec.job.state
        state.status = status  # type: ignore[assignment]
        state.error = error
        state.reason = reason  # type: ignore[assignment]
        state.ended_at = now
        state.updated_at = now
        rec.ended.set()
        if rec.migration_timer is not None:
            rec.migration_timer.cancel()
            rec.migration_timer = None
        if rec.worker is not None:
            rec.worker.jobs.discard(rec.id)
        self._jobs.pop(rec.id, None)
        level = logging.WARNING if status == agent.JS_FAILED else logging.INFO
        if log.isEnabledFor(level):
            fields = {
                **rec.log_fields,
                "status": agent.JobStatus.Name(status),
                "error": error,
                "reason": reason_text or agent.JobStateReason.Name(reason),
            }
            log.log(level, "job ended", extra=fields)

    async def aclose(self) -> None:
        """Stop placing jobs (server shutdown); running jobs stay with their workers."""
        tasks = [
            r.place_task for r in self._jobs.values() if r.place_task and not r.place_task.done()
        ]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rec in list(self._jobs.values()):
            if rec.migration_timer is not None:
                rec.migration_timer.cancel()
