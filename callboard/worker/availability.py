"""One offer from the server, from AvailabilityRequest to a launched job (or a refusal).

`request_fnc` decides within `availability_timeout`; a slow, silent or raising request_fnc is
answered with a rejection, logged with the job id. After an accept, the server's assignment is
awaited for `assignment_timeout` ("assignment for job timed out" otherwise), across a reconnect
when the accept had left before the cut: the assignment may have been lost on the way, so the
next session claims the job (MigrateJobRequest) and the server sends the assignment again.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from livekit.protocol import agent

from callboard.job.context import JobAcceptArguments, JobRequest
from callboard.log import get_logger

if TYPE_CHECKING:
    from callboard.worker.worker import Worker

log = get_logger("worker.availability")


class Offer:
    """Answers one AvailabilityRequest exactly once and follows it to the job's launch."""

    def __init__(self, worker: Worker, job: agent.Job, received: float) -> None:
        self._worker = worker
        self._job = job
        self._session = worker.session
        """The registration that made this offer; only that session may get the answer."""
        self._answered = False
        self._accepted: JobAcceptArguments | None = None
        self._accepted_at = 0.0
        self._received_at = time.time()
        self._received = received
        """time.monotonic() when the offer arrived (answer latency)."""
        self._assignment: asyncio.Future[agent.JobAssignment] = (
            asyncio.get_running_loop().create_future()
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def _fields(self) -> dict[str, object]:
        return {
            "job_id": self._job.id,
            "room": self._job.room.name,
            "worker_id": self._worker.id,
        }

    async def run(self) -> None:
        try:
            await self._decide()
            if self._accepted is not None:
                await self._await_assignment()
        finally:
            self._worker.offer_finished(self._job.id)

    async def _decide(self) -> None:
        opts = self._worker.options.opts
        request = JobRequest(job=self._job, on_reject=self._reject, on_accept=self._accept)
        try:
            async with asyncio.timeout(opts.availability_timeout):
                await opts.request_fnc(request)
        except TimeoutError:
            if not self._answered:
                log.warning(
                    "request_fnc did not answer in time, rejecting the job",
                    extra={**self._fields, "timeout_s": opts.availability_timeout},
                )
        except Exception:
            log.exception("request_fnc failed, rejecting the job", extra=self._fields)
        if not self._answered:
            log.warning("no answer given, automatically rejecting", extra=self._fields)
            await self._reject(False)

    def _first_answer(self) -> bool:
        """Claim the one answer; False (logged) for a second one or a dead session."""
        if self._answered:
            log.warning("job request answered twice; keeping the first answer", extra=self._fields)
            return False
        self._answered = True
        if self._worker.session != self._session or not self._worker.registered:
            log.info("offer from a previous connection, not answered", extra=self._fields)
            return False
        return True

    async def _reject(self, terminate: bool) -> None:
        if not self._first_answer():
            return
        self._worker.send_answer(
            agent.AvailabilityResponse(job_id=self._job.id, available=False, terminate=terminate),
            self._received,
        )

    async def _accept(self, args: JobAcceptArguments) -> None:
        if not self._first_answer():
            return
        problem = self._worker.capacity_problem_for_accept()
        if problem is not None:
            log.info("cannot accept: " + problem, extra=self._fields)
            self._worker.send_answer(
                agent.AvailabilityResponse(job_id=self._job.id, available=False), self._received
            )
            return
        self._accepted = args
        self._accepted_at = time.time()
        resp = agent.AvailabilityResponse(
            job_id=self._job.id,
            available=True,
            participant_identity=args.identity,
            participant_name=args.name,
            participant_metadata=args.metadata,
            participant_attributes=args.attributes or {},
        )
        self._worker.send_answer(resp, self._received)

    async def _await_assignment(self) -> None:
        assert self._accepted is not None
        timeout = self._worker.options.opts.assignment_timeout
        try:
            async with asyncio.timeout(timeout):
                assignment = await asyncio.shield(self._assignment)
        except TimeoutError:
            log.warning(
                "assignment for job timed out", extra={**self._fields, "timeout_s": timeout}
            )
            return
        except asyncio.CancelledError:
            if self._assignment.cancelled():
                log.info("offer withdrawn before assignment", extra=self._fields)
                return
            raise
        await self._worker.running.launch(
            self._accepted, assignment, self._received_at, self._accepted_at
        )

    @property
    def held(self) -> bool:
        """Accepted and not withdrawn: the job is ours, assigned or awaiting its assignment."""
        return self._accepted is not None and not self._assignment.cancelled()

    @property
    def assigned(self) -> bool:
        """The server assigned this job to us: it is ours even while it is still launching."""
        return self._assignment.done() and not self._assignment.cancelled()

    def assign(self, assignment: agent.JobAssignment) -> bool:
        """Deliver the server's assignment; False if this offer was not accepted or is over."""
        if self._accepted is None or self._assignment.done():
            return False
        self._assignment.set_result(assignment)
        return True

    def cancel(self, *, refuse: bool = False) -> None:
        """Withdraw (termination before assignment, or worker closing). With `refuse`, an offer
        still unanswered is refused first, so the server need not wait out its timeout."""
        unanswered = not self._answered
        if refuse and unanswered and self._first_answer():
            log.info("refusing an open offer: the worker is stopping", extra=self._fields)
            self._worker.send_answer(
                agent.AvailabilityResponse(job_id=self._job.id, available=False), self._received
            )
        if not self._assignment.done():
            self._assignment.cancel()
        if self.task is not None and unanswered:
            self.task.cancel()

    def server_lost(self, answer_sent: bool) -> None:
        """The connection dropped. An accept that left (`answer_sent`) still waits for its
        assignment, which the next session claims; one that never left is withdrawn."""
        if self._assignment.done():
            return
        if self._accepted is not None and answer_sent:
            log.info(
                "connection lost after accepting the job: awaiting its assignment on the next "
                "connection",
                extra=self._fields,
            )
            return
        self._assignment.cancel()
