"""Worker: registers with the server, answers offers, runs jobs, reports load, drains.

Lifecycle: starting → registered (available/full) → draining → stopped. One asyncio loop; the
only blocking work (CPU sampling, custom load_fnc) runs in threads. Signals never reach this
module: the CLI calls `request_shutdown()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from livekit.protocol import agent

from callboard.job.context import JobAcceptArguments, JobExecutorType, RunningJobInfo
from callboard.job.executor import JobExecutor, RunningJob
from callboard.job.runner import JobOutcome, failed
from callboard.job.thread import ThreadExecutor
from callboard.log import get_logger, redact_secret
from callboard.version import __version__
from callboard.worker.availability import Offer
from callboard.worker.connection import Connection, Registration
from callboard.worker.errors import ConnectionGiveUp, WorkerStartError
from callboard.worker.load import LoadTracker
from callboard.worker.metrics import WorkerMetrics
from callboard.worker.options import (
    LOAD_SAMPLE_INTERVAL_S,
    LOAD_SAMPLES,
    ResolvedOptions,
    WorkerOptions,
)

log = get_logger("worker")

FINAL_STATUS_FLUSH_S: Final = 5.0
TERMINAL: Final = frozenset({agent.JS_SUCCESS, agent.JS_FAILED})
TASK_STOP_TIMEOUT_S: Final = 5.0
"""How long aclose() waits for its cancelled tasks (connection, status, load, watchers)."""


def idle_target(default_idle: int, draining: bool, max_jobs: int, busy: int) -> int:
    """How many prewarmed processes to keep: none while draining, never more than the job cap
    leaves room for, else the configured pool size."""
    if draining:
        return 0
    if max_jobs:
        return min(default_idle, max(0, max_jobs - busy))
    return default_idle


class WorkerState(Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    AVAILABLE = "available"
    FULL = "full"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False)
class ActiveJob:
    info: RunningJobInfo
    handle: RunningJob
    started_at: float
    outcome: JobOutcome | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Worker:
    """A LiveKit agent worker. Construct, then `await run()`; `drain()`/`aclose()` to stop."""

    def __init__(
        self,
        opts: WorkerOptions,
        *,
        devmode: bool = False,
        register: bool = True,
        executor: JobExecutor | None = None,
    ) -> None:
        self._r: ResolvedOptions = opts.resolve(devmode)
        self._opts = self._r.opts
        self._register = register
        self._executor = executor or self._default_executor()
        self._conn = Connection(
            self._r, self._on_registered, self._on_server_message, self._on_disconnected
        )
        self.metrics = WorkerMetrics()
        self._jobs: dict[str, ActiveJob] = {}
        self._offers: dict[str, Offer] = {}
        self._stop_on_start: set[str] = set()
        """Assigned jobs the server terminated while they were still launching."""
        self._reported: tuple[int, int] | None = None
        """(status, job_count) of the last UpdateWorkerStatus sent."""
        self._load = LoadTracker(self._opts.load_fnc, self, LOAD_SAMPLE_INTERVAL_S, LOAD_SAMPLES)
        self._state = WorkerState.STARTING
        self._draining = False
        self._status_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started_at = time.time()
        self._worker_id = ""
        self._region = ""
        self._gave_up: str | None = None
        self.http_port = 0
        self._first_end: asyncio.Future[JobOutcome] | None = None

    def _default_executor(self) -> JobExecutor:
        if self._opts.job_executor_type == JobExecutorType.THREAD:
            return ThreadExecutor(
                self._opts.entrypoint_fnc,
                self._opts.prewarm_fnc,
                self._opts.shutdown_process_timeout,
            )
        from callboard.job.pool import ProcessExecutor

        return ProcessExecutor.from_options(self._r)

    # -- read-only views (HTTP, metrics, tests) -----------------------------------------------

    @property
    def id(self) -> str:
        return self._worker_id

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def options(self) -> ResolvedOptions:
        return self._r

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def registered(self) -> bool:
        return self._conn.registered.is_set()

    @property
    def session(self) -> int:
        """Which registration this is (1, 2, ... after each reconnect)."""
        return self._conn.session

    @property
    def active_jobs(self) -> list[ActiveJob]:
        return list(self._jobs.values())

    @property
    def executor(self) -> JobExecutor:
        return self._executor

    @property
    def uptime_s(self) -> float:
        return time.time() - self._started_at

    @property
    def load(self) -> float:
        """Effective load: measured plus reservations for jobs the measure cannot see yet."""
        return self._load.effective(len(self._offers), len(self._jobs))

    def capacity_problem_for_accept(self) -> str | None:
        """Why an offer that reserved its slot may no longer be accepted (only a drain)."""
        return "worker is draining" if self._draining else None

    def capacity_problem(self) -> str | None:
        """Why a new offer must be refused right now, or None."""
        if self._draining:
            return "worker is draining"
        if self._opts.max_jobs and len(self._jobs) + len(self._offers) >= self._opts.max_jobs:
            return f"at the job cap (max_jobs={self._opts.max_jobs})"
        threshold = self._r.load_threshold
        if not math.isinf(threshold) and self.load >= threshold:
            return f"load {self.load:.2f} >= load_threshold {threshold:g}"
        return None

    async def wait_first_job_end(self) -> JobOutcome:
        """The outcome of the first job that ends (used by `connect`)."""
        if self._first_end is None:
            self._first_end = asyncio.get_running_loop().create_future()
        return await self._first_end

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start everything, serve until shutdown is requested or the server is lost for good."""
        redact_secret(self._r.api_secret)
        log.info("starting worker", extra={"version": __version__, "pid": os.getpid()})
        from callboard.worker.http import WorkerHttpServer

        http = WorkerHttpServer(self, self._opts.host, self._r.port)
        try:
            await self._start_executor()
            await http.start()
            _collect_startup_garbage()
            self._load.start()
            self._spawn(self._status_task(), "worker-status")
            self._spawn(self._load_task(), "worker-load")
            if self._register:
                self._spawn(self._connection_task(), "worker-connection")
            self._state = WorkerState.CONNECTING
            await self._stop.wait()
        finally:
            await self.aclose()
            await http.aclose()
        if self._gave_up is not None:
            raise ConnectionGiveUp(self._gave_up)

    async def _start_executor(self) -> None:
        try:
            await self._executor.start()
        except Exception as e:
            log.error("the job executor could not start", extra=self._fields(error=str(e)))
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WorkerStartError(f"the job executor could not start: {first_line}") from e

    def request_shutdown(self, fast: bool = False) -> None:
        """Begin an orderly stop: drain (fast: terminate jobs now). Safe from signal handlers."""
        self._spawn(self._shutdown(fast), "worker-shutdown")

    async def _shutdown(self, fast: bool) -> None:
        if fast:
            log.warning("fast shutdown requested: terminating running jobs", extra=self._fields())
            await self._terminate_all("worker shutting down")
        else:
            await self.drain(self._opts.drain_timeout)
        self._stop.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting (FULL at once), let running jobs finish within `timeout`."""
        if not self._draining:
            self._draining = True
            self._state = WorkerState.DRAINING
            log.info("draining worker", extra={**self._fields(), "timeout": timeout})
            self._send_status()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Re-read what is in flight after each change: an accepted offer becomes a job.
        while waits := self._in_flight():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                log.warning(
                    "drain timed out, terminating the jobs still running",
                    extra={**self._fields(), "jobs": list(self._jobs), "timeout": timeout},
                )
                await self._terminate_all("drain timed out")
                return
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    def _in_flight(self) -> list[asyncio.Task[None]]:
        """Tasks that end when every running job and every pending offer is over."""
        waits = [j.watcher for j in self._jobs.values() if j.watcher is not None]
        waits += [o.task for o in self._offers.values() if o.task is not None]
        return [t for t in waits if not t.done()]

    async def _terminate_all(self, reason: str) -> None:
        for offer in list(self._offers.values()):
            offer.cancel(refuse=True)
        jobs = list(self._jobs.values())
        for job in jobs:
            job.handle.terminate(reason)
        watchers = [j.watcher for j in jobs if j.watcher is not None]
        if watchers:
            await asyncio.wait(watchers)

    async def aclose(self) -> None:
        """Close: terminate what still runs, flush final statuses, stop every task."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._draining = True
        await self._terminate_all("worker closing")
        if self.registered:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_STATUS_FLUSH_S):
                    await self._conn.wait_sent()
        await self._cancel_tasks()
        await self._executor.aclose()
        self._load.stop()
        self._state = WorkerState.STOPPED
        self._stop.set()
        log.info("worker stopped", extra=self._fields())

    async def _cancel_tasks(self) -> None:
        """Cancel every task of ours but the caller; a task that will not stop is logged and
        left behind rather than holding the worker open."""
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_S)
        if stuck:
            log.error(
                "tasks did not stop when cancelled; closing without them",
                extra=self._fields(tasks=sorted(t.get_name() for t in stuck)),
            )

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fields(self, **more: Any) -> dict[str, Any]:
        return {"worker_id": self._worker_id, "agent_name": self._r.agent_name, **more}

    # -- connection ---------------------------------------------------------------------------

    async def _connection_task(self) -> None:
        try:
            await self._conn.run()
        except Exception as e:
            if not isinstance(e, ConnectionGiveUp):
                log.exception("the server connection failed", extra=self._fields())
                e = ConnectionGiveUp(f"the server connection failed: {e!r}")
            self._gave_up = str(e)
            log.error(
                "giving up on the server: draining and exiting",
                extra={**self._fields(), "reason": str(e)},
            )
            await self.drain(self._opts.drain_timeout)
            self._stop.set()

    def _on_registered(self, reg: Registration) -> list[agent.WorkerMessage]:
        self._worker_id = reg.worker_id
        self._region = reg.server_info.region
        log.info(
            "registered worker",
            extra={
                "id": reg.worker_id,
                "worker_id": reg.worker_id,
                "url": self._r.ws_url,
                "region": reg.server_info.region,
                "protocol": reg.server_info.protocol,
                "reconnect": reg.reconnect,
            },
        )
        first: list[agent.WorkerMessage] = []
        ours = self._owned_job_ids()
        if reg.reconnect and ours:
            migrate = agent.MigrateJobRequest(job_ids=ours)
            first.append(agent.WorkerMessage(migrate_job=migrate))
            log.info("migrating running jobs", extra=self._fields(jobs=ours))
        first.append(self._status_message())
        self._update_state()
        return first

    def _owned_job_ids(self) -> list[str]:
        """Jobs the server must attach to this worker's new session: the running ones, the
        assigned ones still launching, and the ended ones whose final status is still queued
        (without the migration the server would ignore that status and fail the job)."""
        launching = [i for i, o in self._offers.items() if o.assigned]
        unreported = [
            m.update_job.job_id
            for m in self._conn.pending()
            if m.WhichOneof("message") == "update_job" and m.update_job.status in TERMINAL
        ]
        return list(dict.fromkeys([*self._jobs, *launching, *unreported]))

    def _on_disconnected(self, reason: str) -> None:
        for offer in list(self._offers.values()):
            offer.server_lost()
        self._update_state()

    def _on_server_message(self, msg: agent.ServerMessage) -> None:
        which = msg.WhichOneof("message")
        if which == "availability":
            self._on_availability(msg.availability)
        elif which == "assignment":
            self._on_assignment(msg.assignment)
        elif which == "termination":
            self._on_termination(msg.termination.job_id)
        elif which == "pong":
            return
        else:
            log.debug("ignored server message", extra=self._fields(message=which))

    # -- offers and assignments ---------------------------------------------------------------

    def _on_availability(self, req: agent.AvailabilityRequest) -> None:
        job = req.job
        log.info(
            "received job request",
            extra=self._fields(job_id=job.id, room_name=job.room.name, room=job.room.name),
        )
        self.metrics.offers.inc()
        problem = self.capacity_problem()
        if problem is not None or job.id in self._offers or job.id in self._jobs:
            why = problem or "duplicate offer for a job already offered or running"
            log.info("rejecting job", extra=self._fields(job_id=job.id, reason=why))
            self._answer(agent.AvailabilityResponse(job_id=job.id, available=False))
            return
        offer = Offer(self, job)
        self._offers[job.id] = offer
        offer.task = self._spawn(offer.run(), f"offer-{job.id}")
        self._update_state()

    def _answer(self, resp: agent.AvailabilityResponse) -> None:
        self._conn.send(agent.WorkerMessage(availability=resp))

    def offer_finished(self, job_id: str) -> None:
        self._offers.pop(job_id, None)
        self._update_state()

    def _on_assignment(self, assignment: agent.JobAssignment) -> None:
        offer = self._offers.get(assignment.job.id)
        if offer is None or not offer.assign(assignment):
            log.warning(
                "assignment for a job this worker did not accept, reporting it failed",
                extra=self._fields(job_id=assignment.job.id),
            )
            self._report(assignment.job.id, failed("worker had not accepted this job"))

    def _on_termination(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            log.info("job termination requested by the server", extra=self._job_fields(job))
            job.handle.terminate("terminated by the server")
            return
        offer = self._offers.get(job_id)
        if offer is not None and offer.assigned:
            log.info(
                "termination for a job still launching: it stops as soon as it starts",
                extra=self._fields(job_id=job_id),
            )
            self._stop_on_start.add(job_id)
            return
        if offer is not None:
            offer.cancel()
            return
        log.info("termination for an unknown job, ignored", extra=self._fields(job_id=job_id))

    async def launch(
        self,
        args: JobAcceptArguments,
        assignment: agent.JobAssignment,
        received_at: float,
        accepted_at: float,
    ) -> None:
        """Start an assigned job through the executor and watch it to its end."""
        info = RunningJobInfo(
            accept_arguments=args,
            job=assignment.job,
            url=assignment.url if assignment.HasField("url") and assignment.url else self._r.ws_url,
            token=assignment.token,
            worker_id=self._worker_id,
            received_at=received_at,
            accepted_at=accepted_at,
            assigned_at=time.time(),
        )
        job_id = assignment.job.id
        try:
            handle = await self._executor.launch(info)
        except Exception as e:
            self._stop_on_start.discard(job_id)
            log.exception("could not launch job", extra=self._fields(job_id=job_id))
            self._report(job_id, failed(f"launch failed: {e}"))
            return
        active = ActiveJob(info=info, handle=handle, started_at=time.time())
        self._jobs[job_id] = active
        self._load.job_started(job_id)
        self.metrics.job_started(time.time() - received_at if received_at else 0.0)
        self._report_status(job_id, agent.JS_RUNNING)
        active.watcher = self._spawn(self._watch(active), f"job-{job_id}")
        if job_id in self._stop_on_start:
            self._stop_on_start.discard(job_id)
            handle.terminate("terminated by the server")
        self._update_state()

    async def _watch(self, job: ActiveJob) -> None:
        try:
            outcome = await job.handle.wait()
        except Exception as e:
            outcome = failed(f"job supervision failed: {e!r}")
        job.outcome = outcome
        if self._first_end is not None and not self._first_end.done():
            self._first_end.set_result(outcome)
        self._jobs.pop(job.info.job.id, None)
        self._load.job_ended(job.info.job.id)
        self._report(job.info.job.id, outcome)
        self.metrics.job_ended(outcome)
        level_ok = outcome.ok
        (log.info if level_ok else log.warning)(
            "job ended",
            extra={**self._job_fields(job), "status": outcome.status_name, "error": outcome.error},
        )
        self._update_state()

    def _job_fields(self, job: ActiveJob) -> dict[str, Any]:
        return self._fields(job_id=job.info.job.id, room=job.info.job.room.name, pid=job.handle.pid)

    def _report(self, job_id: str, outcome: JobOutcome) -> None:
        self._report_status(job_id, outcome.status, outcome.error)

    def _report_status(self, job_id: str, status: int, error: str = "") -> None:
        upd = agent.UpdateJobStatus(job_id=job_id, status=status, error=error)  # type: ignore[arg-type]
        self._conn.send(agent.WorkerMessage(update_job=upd))

    def send_answer(self, resp: agent.AvailabilityResponse) -> None:
        self._answer(resp)

    # -- status and load ----------------------------------------------------------------------

    def _status_now(self) -> tuple[int, int]:
        """(status, job_count) as the server should see them now."""
        full = self.capacity_problem() is not None
        return (agent.WS_FULL if full else agent.WS_AVAILABLE), len(self._jobs)

    def _status_message(self) -> agent.WorkerMessage:
        """The UpdateWorkerStatus to send now; remembered as the last one reported."""
        status, job_count = self._status_now()
        self._reported = (status, job_count)
        upd = agent.UpdateWorkerStatus(
            status=status,  # type: ignore[arg-type]
            load=self.load,
            job_count=job_count,
            draining=self._draining,
        )
        return agent.WorkerMessage(update_worker=upd)

    def _send_status(self) -> None:
        if self.registered:
            self._conn.send(self._status_message())

    def _update_state(self) -> None:
        """Recompute AVAILABLE/FULL and log a transition; when the status or the job count
        differs from what the server last heard, tell it at once (not at the next tick)."""
        if self._draining:
            new = WorkerState.DRAINING
        elif not self.registered:
            new = WorkerState.CONNECTING
        else:
            new = WorkerState.FULL if self.capacity_problem() else WorkerState.AVAILABLE
        if new != self._state:
            old, self._state = self._state, new
            log.info(
                "worker state changed",
                extra=self._fields(**{"from": old.value, "to": new.value, "jobs": len(self._jobs)}),
            )
        if self.registered and self._reported != self._status_now():
            self._status_changed.set()
        self._executor.set_idle_target(
            idle_target(
                self._r.num_idle_processes,
                self._draining,
                self._opts.max_jobs,
                len(self._jobs) + len(self._offers),
            )
        )

    async def _status_task(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands
            # as the event is set, and this loop would then outlive aclose().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._opts.status_interval):
                    await self._status_changed.wait()
            self._status_changed.clear()
            self._send_status()

    async def _load_task(self) -> None:
        while True:
            await asyncio.sleep(LOAD_SAMPLE_INTERVAL_S)
            await self._load.sample()
            self.metrics.load.set(self.load)
            self._update_state()


def _collect_startup_garbage() -> None:
    """One full collection once started, before registering, while no job is in flight.

    Start-up leaves many objects that a full collection has not seen yet, so Python's first
    one comes due at the first allocations, i.e. on the first burst of offers, and holds this
    loop for about 15 ms on a small machine (bench/jobs.py). Collected now, those objects are
    counted as long-lived and the next full collection waits for 25% more of them.
    """
    gc.collect()
