"""The worker's running jobs: from the server's assignment to the one status reported for each.

`RunningJobs.launch` hands an assigned job to the executor, reports JS_RUNNING and watches the
job to its outcome, which is reported to the server (JS_SUCCESS or JS_FAILED with the reason),
logged in one line, and counted. The outcome goes out as soon as the job knows it, before its
agent leaves the room: livekit-server fails a job whose agent leaves first ("agent worker left
the room"). The job keeps its place here until it has closed. A connection cut can lose a
status already handed to the socket, so a final status is kept until the server has it (a
WorkerPing queued after it is answered) and sent again after a reconnect, for at most
`FINAL_STATUS_RESEND_S`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from livekit import api
from livekit.protocol import agent, models

from callboard.job.context import JobAcceptArguments, RunningJobInfo
from callboard.job.executor import RunningJob
from callboard.job.runner import JobOutcome, failed
from callboard.log import get_logger
from callboard.worker.connection import HEARTBEAT_INTERVAL_S

if TYPE_CHECKING:
    from callboard.worker.worker import Worker

log = get_logger("worker")

FINAL_STATUS_RESEND_S: Final = HEARTBEAT_INTERVAL_S
"""How long an unconfirmed final status stays ready to be sent again after a reconnect: a cut
loses what was still in flight, and a stalled connection is noticed only by its heartbeat."""


@dataclass(eq=False)
class ActiveJob:
    info: RunningJobInfo
    handle: RunningJob
    started_at: float
    outcome: JobOutcome | None = None
    reported: bool = False
    """Its final status is with the server (it may still be closing)."""
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class RunningJobs:
    """Launches assigned jobs, watches each to its end and reports its status."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.active: dict[str, ActiveJob] = {}
        self.stop_on_start: set[str] = set()
        """Assigned jobs the server terminated while they were still launching."""
        self._ends: dict[str, tuple[int, agent.UpdateJobStatus]] = {}
        """Final statuses the server may not have yet, by job id, oldest first, each with the
        time.monotonic_ns() it was queued at."""
        self._first_end: asyncio.Future[JobOutcome] | None = None

    async def wait_first_end(self) -> JobOutcome:
        """The outcome of the first job that ends."""
        if self._first_end is None:
            self._first_end = asyncio.get_running_loop().create_future()
        return await self._first_end

    def watchers(self) -> list[asyncio.Task[None]]:
        return [j.watcher for j in self.active.values() if j.watcher is not None]

    async def launch(
        self,
        args: JobAcceptArguments,
        assignment: agent.JobAssignment,
        received_at: float,
        accepted_at: float,
    ) -> None:
        """Start an assigned job through the executor and watch it to its end."""
        w = self._worker
        info = RunningJobInfo(
            accept_arguments=args,
            job=assignment.job,
            url=assignment.url if assignment.HasField("url") and assignment.url else w.ws_url,
            token=assignment.token,
            worker_id=w.id,
            received_at=received_at,
            accepted_at=accepted_at,
            assigned_at=time.time(),
        )
        job_id = assignment.job.id
        try:
            handle = await w.executor.launch(info)
        except Exception as e:
            self.stop_on_start.discard(job_id)
            log.exception("could not launch job", extra=w.log_fields(job_id=job_id))
            self.report(job_id, failed(f"launch failed: {e}"))
            return
        active = ActiveJob(info=info, handle=handle, started_at=time.time())
        self.active[job_id] = active
        w.job_started(job_id, time.time() - received_at if received_at else 0.0)
        self.report_status(job_id, agent.JS_RUNNING)
        active.watcher = w.spawn(self._watch(active), f"job-{job_id}")
        if job_id in self.stop_on_start:
            self.stop_on_start.discard(job_id)
            handle.terminate("terminated by the server")
        w.update_state()

    async def launch_local(self, room: models.Room, identity: str) -> None:
        """Run one job for `room` that no server dispatched (`connect --room`, as livekit-agents
        does it): a job id and a room token minted here with the worker's key."""
        w = self._worker
        job = agent.Job(id=f"job-{secrets.token_hex(6)}", type=agent.JT_ROOM, room=room)
        token = (
            api.AccessToken(w.options.api_key, w.options.api_secret)
            .with_identity(identity)
            .with_kind("agent")
            .with_grants(api.VideoGrants(room_join=True, room=room.name, agent=True))
            .to_jwt()
        )
        assignment = agent.JobAssignment(job=job, token=token, url=w.ws_url)
        now = time.time()
        await self.launch(JobAcceptArguments("", identity, ""), assignment, now, now)

    async def _watch(self, job: ActiveJob) -> None:
        job_id = job.info.job.id
        try:
            reported = await job.handle.wait_outcome()
            self.report(job_id, reported)
            job.reported = True
            outcome = await job.handle.wait()
        except Exception as e:
            outcome = failed(f"job supervision failed: {e!r}")
            if not job.reported:
                reported = outcome
                self.report(job_id, reported)
                job.reported = True
        job.outcome = outcome
        if self._first_end is not None and not self._first_end.done():
            self._first_end.set_result(outcome)
        self.active.pop(job_id, None)
        self._worker.job_ended(job_id, outcome)
        fields = {**self.job_fields(job), "status": outcome.status_name, "error": outcome.error}
        if outcome.status != reported.status:
            log.warning(
                "job failed while closing, after its outcome was reported to the server",
                extra={**fields, "reported": reported.status_name},
            )
        else:
            (log.info if outcome.ok else log.warning)("job ended", extra=fields)
        self._worker.update_state()

    def terminate(self, job_id: str, reason: str) -> bool:
        """Ask a running job to stop; False if no such job runs here."""
        job = self.active.get(job_id)
        if job is None:
            return False
        log.info("job termination requested by the server", extra=self.job_fields(job))
        job.handle.terminate(reason)
        return True

    async def terminate_all(self, reason: str) -> None:
        jobs = list(self.active.values())
        for job in jobs:
            job.handle.terminate(reason)
        watchers = [j.watcher for j in jobs if j.watcher is not None]
        if watchers:
            await asyncio.wait(watchers)

    def job_fields(self, job: ActiveJob) -> dict[str, Any]:
        return self._worker.log_fields(
            job_id=job.info.job.id, room=job.info.job.room.name, pid=job.handle.pid
        )

    def report(self, job_id: str, outcome: JobOutcome) -> None:
        """Report the end of a job of ours, kept to send again until the server has it."""
        self._keep_end(self.report_status(job_id, outcome.status, outcome.error))
        self._ask_receipt()

    def _keep_end(self, upd: agent.UpdateJobStatus) -> None:
        self._ends.pop(upd.job_id, None)
        self._ends[upd.job_id] = (time.monotonic_ns(), upd)

    def _ask_receipt(self) -> None:
        """Queue a WorkerPing after the statuses: its pong says the server got them."""
        ping = agent.WorkerPing(timestamp=time.monotonic_ns())
        self._worker.send(agent.WorkerMessage(ping=ping))

    def received(self, stamp: int) -> None:
        """The server answered the WorkerPing stamped `stamp`: it has what was queued before."""
        self._forget_ends_before(stamp)

    def unconfirmed_ends(self) -> list[str]:
        """The jobs whose final status the server may not have (at most FINAL_STATUS_RESEND_S
        old)."""
        self._forget_ends_before(time.monotonic_ns() - int(FINAL_STATUS_RESEND_S * 1e9))
        return list(self._ends)

    def _forget_ends_before(self, stamp: int) -> None:
        while self._ends and next(iter(self._ends.values()))[0] <= stamp:
            del self._ends[next(iter(self._ends))]

    def report_ends_again(self, job_ids: list[str]) -> None:
        """Queue again the final statuses of `job_ids` (from `unconfirmed_ends`)."""
        for job_id in job_ids:
            upd = self._ends[job_id][1]
            self._worker.send(agent.WorkerMessage(update_job=upd))
            self._keep_end(upd)
        if job_ids:
            self._ask_receipt()

    def report_status(self, job_id: str, status: int, error: str = "") -> agent.UpdateJobStatus:
        upd = agent.UpdateJobStatus(job_id=job_id, status=status, error=error)  # type: ignore[arg-type]
        self._worker.send(agent.WorkerMessage(update_job=upd))
        return upd
