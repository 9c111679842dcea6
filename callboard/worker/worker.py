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
from typing import Any, Final

from livekit.protocol import agent, models

from callboard.job.executor import JobExecutor
from callboard.job.runner import JobOutcome
from callboard.log import get_logger, redact_secret
from callboard.version import __version__
from callboard.worker.availability import Offer
from callboard.worker.connection import Connection, Registration
from callboard.worker.errors import ConnectionGiveUp, WorkerStartError
from callboard.worker.executors import build_executor
from callboard.worker.jobs import ActiveJob, RunningJobs
from callboard.worker.load import LoadTracker, budgets_for
from callboard.worker.metrics import WorkerMetrics
from callboard.worker.options import (
    LOAD_SAMPLE_INTERVAL_S,
    LOAD_SAMPLES,
    ResolvedOptions,
    WorkerOptions,
)
from callboard.worker.status import StatusReporter, WorkerState
from callboard.worker.warm_pool import Demand, warm_target

log = get_logger("worker")

FINAL_STATUS_FLUSH_S: Final = 5.0
TERMINAL: Final = frozenset({agent.JS_SUCCESS, agent.JS_FAILED})
TASK_STOP_TIMEOUT_S: Final = 5.0
"""How long aclose() waits for its cancelled tasks (connection, status, load, watchers)."""


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
        self._executor = executor or build_executor(self._r)
        self._conn = Connection(
            self._r, self._on_registered, self._on_server_message, self._on_disconnected
        )
        self.metrics = WorkerMetrics()
        self._running = RunningJobs(self)
        self._jobs = self._running.active
        self._offers: dict[str, Offer] = {}
        self._claimed: frozenset[str] = frozenset()
        """The jobs the last MigrateJobRequest claimed: the server may assign them again."""
        self._status = StatusReporter(self)
        self._load = LoadTracker(
            self._opts.load_fnc,
            self,
            LOAD_SAMPLE_INTERVAL_S,
            LOAD_SAMPLES,
            budgets_for(self._r),
            self._opts.initial_job_cost,
            own_tree=self._opts.cpu_budget is not None,
        )
        self._demand = Demand(self._opts.idle_processes_window)
        self._state = WorkerState.STARTING
        self._draining = False
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started_at = time.time()
        self._worker_id = ""
        self._region = ""
        self._gave_up: str | None = None
        self.http_port = 0
        self.started = asyncio.Event()
        """Set once the executor and the HTTP server are up."""

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
        return self._load.effective(len(self._offers))

    @property
    def admission(self) -> LoadTracker:
        """The load, the learned job cost and the capacity (read-only use)."""
        return self._load

    def capacity_problem_for_accept(self) -> str | None:
        """Why an offer that reserved its slot may no longer be accepted (only a drain)."""
        return "worker is draining" if self._draining else None

    def capacity_problem(self) -> str | None:
        """Why a new offer must be refused right now, or None."""
        if self._draining:
            return "worker is draining"
        return self._load.problem(len(self._offers))

    async def wait_first_job_end(self) -> JobOutcome:
        """The outcome of the first job that ends (used by `connect`)."""
        return await self._running.wait_first_end()

    @property
    def ws_url(self) -> str:
        return self._r.ws_url

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
            self._load.set_shared_pids(self._executor.shared_pids())
            self._load.start()
            self._load.log_capacity(self.log_fields())
            self.spawn(self._status.run(self._opts.status_interval), "worker-status")
            self.spawn(self._load_task(), "worker-load")
            if self._register:
                self.spawn(self._connection_task(), "worker-connection")
            self._state = WorkerState.CONNECTING
            self.started.set()
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
            log.error("the job executor could not start", extra=self.log_fields(error=str(e)))
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WorkerStartError(f"the job executor could not start: {first_line}") from e

    def request_shutdown(self, fast: bool = False) -> None:
        """Begin an orderly stop: drain (fast: terminate jobs now). Safe from signal handlers."""
        self.spawn(self._shutdown(fast), "worker-shutdown")

    async def _shutdown(self, fast: bool) -> None:
        if fast:
            log.warning("fast shutdown: terminating running jobs", extra=self.log_fields())
            await self._terminate_all("worker shutting down")
        else:
            await self.drain(self._opts.drain_timeout)
        self._stop.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting (FULL at once), let running jobs finish within `timeout`."""
        if not self._draining:
            self._draining = True
            self._state = WorkerState.DRAINING
            log.info("draining worker", extra={**self.log_fields(), "timeout": timeout})
            self._status.send()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Re-read what is in flight after each change: an accepted offer becomes a job.
        while waits := self._in_flight():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                log.warning(
                    "drain timed out, terminating the jobs still running",
                    extra={**self.log_fields(), "jobs": list(self._jobs), "timeout": timeout},
                )
                await self._terminate_all("drain timed out")
                return
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    def _in_flight(self) -> list[asyncio.Task[None]]:
        """Tasks that end when every running job and every pending offer is over."""
        waits = self._running.watchers()
        waits += [o.task for o in self._offers.values() if o.task is not None]
        return [t for t in waits if not t.done()]

    async def _terminate_all(self, reason: str) -> None:
        for offer in list(self._offers.values()):
            offer.cancel(refuse=True)
        await self._running.terminate_all(reason)

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
        log.info("worker stopped", extra=self.log_fields())

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
                extra=self.log_fields(tasks=sorted(t.get_name() for t in stuck)),
            )

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run `coro` as one of the worker's tasks (cancelled by aclose)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def log_fields(self, **more: Any) -> dict[str, Any]:
        return {"worker_id": self._worker_id, "agent_name": self._r.agent_name, **more}

    # -- connection ---------------------------------------------------------------------------

    async def _connection_task(self) -> None:
        try:
            await self._conn.run()
        except Exception as e:
            if not isinstance(e, ConnectionGiveUp):
                log.exception("the server connection failed", extra=self.log_fields())
                e = ConnectionGiveUp(f"the server connection failed: {e!r}")
            self._gave_up = str(e)
            log.error(
                "giving up on the server: draining and exiting",
                extra={**self.log_fields(), "reason": str(e)},
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
        ours = self._reclaim() if reg.reconnect else []
        self._claimed = frozenset(ours)
        if ours:
            migrate = agent.MigrateJobRequest(job_ids=ours)
            first.append(agent.WorkerMessage(migrate_job=migrate))
            log.info("migrating running jobs", extra=self.log_fields(jobs=ours))
        first.append(self._status.message())
        self.update_state()
        return first

    def _reclaim(self) -> list[str]:
        """The jobs the server must attach to this worker's new session: the running ones (not
        those closing after their final status went out), the accepted ones (still launching,
        or awaiting an assignment the cut may have lost), and the ended or closing ones whose
        final status is still queued or was sent and not yet confirmed (the cut may have lost
        it: it is sent again). Without the claim the server would ignore their statuses and
        fail them."""
        running = [i for i, job in self._jobs.items() if not job.reported]
        held = [i for i, o in self._offers.items() if o.held]
        queued = {
            m.update_job.job_id
            for m in self._conn.pending()
            if m.WhichOneof("message") == "update_job" and m.update_job.status in TERMINAL
        }
        ended = self._running.unconfirmed_ends()
        self._running.report_ends_again([j for j in ended if j not in queued])
        return list(dict.fromkeys([*running, *held, *queued, *ended]))

    def _on_disconnected(self, reason: str) -> None:
        unsent = {
            m.availability.job_id
            for m in self._conn.pending()
            if m.WhichOneof("message") == "availability"
        }
        for job_id, offer in list(self._offers.items()):
            offer.server_lost(answer_sent=job_id not in unsent)
        self.update_state()

    def _on_server_message(self, msg: agent.ServerMessage) -> None:
        which = msg.WhichOneof("message")
        if which == "availability":
            self._on_availability(msg.availability)
        elif which == "assignment":
            self._on_assignment(msg.assignment)
        elif which == "termination":
            self._on_termination(msg.termination.job_id)
        elif which == "pong":
            self._running.received(msg.pong.last_timestamp)
        else:
            log.debug("ignored server message", extra=self.log_fields(message=which))

    # -- offers and assignments ---------------------------------------------------------------

    def _on_availability(self, req: agent.AvailabilityRequest) -> None:
        job = req.job
        log.info(
            "received job request",
            extra=self.log_fields(job_id=job.id, room_name=job.room.name, room=job.room.name),
        )
        received = time.monotonic()
        self.metrics.offers.inc()
        problem = self.capacity_problem()
        if problem is not None or job.id in self._offers or job.id in self._jobs:
            why = problem or "duplicate offer for a job already offered or running"
            log.info("rejecting job", extra=self.log_fields(job_id=job.id, reason=why))
            self.send_answer(agent.AvailabilityResponse(job_id=job.id, available=False), received)
            return
        offer = Offer(self, job, received)
        self._offers[job.id] = offer
        self._demand.admitted(received)
        offer.task = self.spawn(offer.run(), f"offer-{job.id}")
        self.update_state()

    def offer_finished(self, job_id: str) -> None:
        self._offers.pop(job_id, None)
        self.update_state()

    def _on_assignment(self, assignment: agent.JobAssignment) -> None:
        job_id = assignment.job.id
        offer = self._offers.get(job_id)
        if offer is not None and offer.assign(assignment):
            return
        if job_id in self._claimed:
            log.info(
                "assignment sent again for a job this worker already holds, ignored",
                extra=self.log_fields(job_id=job_id),
            )
            return
        log.warning(
            "assignment for a job this worker did not accept, reporting it failed",
            extra=self.log_fields(job_id=job_id),
        )
        self._running.report_status(job_id, agent.JS_FAILED, "worker had not accepted this job")

    def _on_termination(self, job_id: str) -> None:
        if self._running.terminate(job_id, "terminated by the server"):
            return
        offer = self._offers.get(job_id)
        if offer is not None and offer.assigned:
            log.info(
                "termination for a job still launching: it stops as soon as it starts",
                extra=self.log_fields(job_id=job_id),
            )
            self._running.stop_on_start.add(job_id)
            return
        if offer is not None:
            offer.cancel()
            return
        log.info("termination for an unknown job, ignored", extra=self.log_fields(job_id=job_id))

    @property
    def running(self) -> RunningJobs:
        """The jobs assigned to this worker, from launch to their reported end."""
        return self._running

    async def run_local_job(self, room: models.Room, identity: str) -> None:
        """Run one job for `room` without a dispatch from the server (`connect --room`)."""
        await self._running.launch_local(room, identity)

    def job_started(self, job_id: str, dispatch_s: float) -> None:
        self._load.job_started(job_id, self._jobs[job_id].handle)
        self.metrics.job_started(dispatch_s)

    def job_ended(self, job_id: str, outcome: JobOutcome) -> None:
        self._load.job_ended(job_id)
        self.metrics.job_ended(outcome)

    def send(self, msg: agent.WorkerMessage) -> None:
        """Queue a message for the server (sent in order, kept across a reconnect)."""
        self._conn.send(msg)

    def send_answer(self, resp: agent.AvailabilityResponse, received: float) -> None:
        """Answer an offer received at `received` (time.monotonic()), timed in the metrics."""
        self._conn.send(agent.WorkerMessage(availability=resp))
        self.metrics.answered(resp.available, time.monotonic() - received)

    # -- state and load -----------------------------------------------------------------------

    def update_state(self) -> None:
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
                extra=self.log_fields(
                    **{"from": old.value, "to": new.value, "jobs": len(self._jobs)}
                ),
            )
        self._status.check()
        capacity = self._load.capacity
        room = math.inf if capacity is None else capacity - len(self._jobs) - len(self._offers)
        burst = self._demand.burst(time.monotonic())
        target = warm_target(self._r.num_idle_processes, burst, room, self._draining)
        self.metrics.warm_target.set(target)
        self._executor.set_warm_target(target)

    async def _load_task(self) -> None:
        while True:
            await asyncio.sleep(LOAD_SAMPLE_INTERVAL_S)
            self._load.set_shared_pids(self._executor.shared_pids())
            if await self._load.sample():
                self._load.log_capacity(self.log_fields())
            self.metrics.sampled(self._load, self.load)
            self.update_state()


def _collect_startup_garbage() -> None:
    """One full collection once started, before registering, while no job is in flight.

    Start-up leaves many objects that a full collection has not seen yet, so Python's first
    one comes due at the first allocations, i.e. on the first burst of offers, and holds this
    loop for about 15 ms on a small machine (bench/jobs.py). Collected now, those objects are
    counted as long-lived and the next full collection waits for 25% more of them.
    """
    gc.collect()
