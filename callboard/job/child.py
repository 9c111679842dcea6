"""Code that runs inside a job process, right after the zygote forked it.

Re-initialise (fresh loop, reseeded RNG, ignore SIGINT/SIGTERM: the worker decides), run
`prewarm_fnc`, report Initialized, then serve the worker's messages: StartJob (one, or several
at once when the worker shares processes), pings, shutdowns. Logs travel to the worker over the
same socket. The process exits when the worker hangs up, which it does after the last job.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from livekit.protocol import agent, models

from callboard.job import heap, ipc
from callboard.job.context import JobAcceptArguments, JobExecutorType, JobProcess, RunningJobInfo
from callboard.job.flavour import new_job_context, new_job_process
from callboard.job.inference import InferenceClient, registered_runners, socket_name
from callboard.job.runner import Entrypoint, JobOutcome, RunnableJob, run_job
from callboard.log import extra_fields, root_logging_kept

EXIT_OK: Final = 0
EXIT_PREWARM_FAILED: Final = 3
EXIT_CRASHED: Final = 4
STACK_DUMP_SIGNAL: Final = signal.SIGUSR1
JOB_LOG_FIELDS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar(
    "callboard_job_log_fields", default=()
)
"""The ids of the job whose task writes a log record (set in each job's own context)."""


def stack_dump_path(pid: int) -> Path:
    """Where a job process writes its thread stacks on STACK_DUMP_SIGNAL."""
    return Path(tempfile.gettempdir()) / f"callboard-stacks-{pid}.txt"


def prepare_for_forks() -> None:
    """Run once in the zygote, before it forks: what every child would otherwise load or
    compute itself (ctypes for prctl, the temp dir probe) is then shared, not redone."""
    global _set_pdeathsig
    if _set_pdeathsig is None:
        _set_pdeathsig = _load_pdeathsig()
    tempfile.gettempdir()


def after_fork(keep_fds: set[int]) -> None:
    """Make the forked child its own process: signals and descriptors. Randomness needs nothing:
    `random` reseeds itself in a forked child (os.register_at_fork) and OpenSSL (3.x, 1.1.1)
    reseeds its generator when it sees a new pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    keep = keep_fds | {0, 1, 2}
    for fd in _open_fds():
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    die_with_parent = _set_pdeathsig or _load_pdeathsig()
    die_with_parent()


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []


def _load_pdeathsig() -> Callable[[], None]:
    """Linux: a call that makes the kernel SIGKILL this process when its parent (the zygote)
    dies, so no job outlives its worker. A no-op where prctl is unavailable."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return lambda: None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


_set_pdeathsig: Callable[[], None] | None = None


@dataclass(frozen=True)
class ChildSpec:
    """What a job process runs, as the zygote hands it over at fork."""

    entrypoint: Entrypoint
    prewarm: Callable[[JobProcess], Any] | None
    log_level: int
    shutdown_timeout: float
    zygote_pid: int
    rehearse_job_start: bool = False
    """A warm-pool process: rehearse a job start while idle (see _rehearse_job_start)."""


def child_main(sock: socket.socket, spec: ChildSpec) -> int:
    """Body of a job process; returns its exit code."""
    dump_path = stack_dump_path(os.getpid())
    dump = dump_path.open("w")
    faulthandler.register(STACK_DUMP_SIGNAL, file=dump, all_threads=True)
    asyncio.set_event_loop_policy(None)
    try:
        return asyncio.run(_serve(sock, spec))
    except BaseException:
        traceback.print_exc()
        return EXIT_CRASHED
    finally:
        # a process that ends on its own leaves no dump file (the worker removes the
        # file of a process it killed, after reading it)
        faulthandler.unregister(STACK_DUMP_SIGNAL)
        dump.close()
        with contextlib.suppress(OSError):
            dump_path.unlink()


class IpcLogHandler(logging.Handler):
    """Forwards records to the worker as LogRecordMsg frames."""

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._writer = writer
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = ""
            if record.exc_info:
                exc_text = "".join(traceback.format_exception(*record.exc_info))
            extra = {k: _plain(v) for k, v in extra_fields(record).items()}
            extra = {**dict(JOB_LOG_FIELDS.get()), **extra}
            frame = ipc.encode(
                ipc.LogRecordMsg(record.levelno, record.name, record.getMessage(), extra, exc_text)
            )
            if self._loop.is_closed():
                return
            self._loop.call_soon_threadsafe(self._write, frame)
        except Exception:
            self.handleError(record)

    def _write(self, frame: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(frame)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


async def _serve(sock: socket.socket, spec: ChildSpec) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    # drain() then waits until every byte is in the kernel: the last frames must not die with us
    writer.transport.set_write_buffer_limits(high=0)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(IpcLogHandler(writer, loop))
    root.setLevel(spec.log_level)

    proc = new_job_process(JobExecutorType.PROCESS)
    error = ""
    if spec.prewarm is not None:
        try:
            spec.prewarm(proc)
        except Exception as e:
            error = f"prewarm_fnc raised {type(e).__name__}: {e}\n{traceback.format_exc()}"
    if spec.rehearse_job_start and not error:
        await _rehearse_job_start(spec.shutdown_timeout)
    writer.write(ipc.encode(ipc.Initialized(os.getpid(), error)))
    await _drain(writer)
    if error:
        return EXIT_PREWARM_FAILED

    trimmer = asyncio.ensure_future(heap.trim_periodically())
    try:
        return await _serve_jobs(reader, writer, proc, spec)
    finally:
        trimmer.cancel()


async def _serve_jobs(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proc: Any, spec: ChildSpec
) -> int:
    """The worker's messages until it hangs up: jobs started, stopped and reported, pings."""
    inference = None
    if registered_runners():
        inference = InferenceClient(socket_name(spec.zygote_pid))
    jobs: dict[str, tuple[RunnableJob, asyncio.Task[JobOutcome]]] = {}
    reader_task = asyncio.ensure_future(ipc.read_message(reader))
    while True:
        await asyncio.wait(
            {reader_task, *(task for _, task in jobs.values())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        finished = [job_id for job_id, (_, task) in jobs.items() if task.done()]
        for job_id in finished:
            outcome = jobs.pop(job_id)[1].result()
            writer.write(ipc.encode(ipc.JobDone(outcome.status, outcome.error, job_id)))
        if finished:
            await _drain(writer)
        if not reader_task.done():
            continue
        msg = reader_task.result()
        if msg is None:
            # after the last job the worker's hang-up is its acknowledgement of our JobDone;
            # with jobs still running the worker is gone: stop them, nobody is left to report to
            await _stop_all(jobs, "worker connection lost", spec.shutdown_timeout)
            writer.close()
            return EXIT_OK
        reader_task = asyncio.ensure_future(ipc.read_message(reader))
        if isinstance(msg, ipc.Ping):
            writer.write(ipc.encode(ipc.Pong(msg.timestamp, time.time())))
        elif isinstance(msg, ipc.StartJob):
            info = msg.running_info()
            if info.job.id not in jobs:
                ctx = new_job_context(proc, info, inference)
                job = _run_tagged(ctx, spec, _outcome_sender(writer, info.job.id))
                jobs[info.job.id] = (ctx, asyncio.ensure_future(job))
        elif isinstance(msg, ipc.Shutdown):
            if msg.job_id:
                if msg.job_id in jobs:
                    jobs[msg.job_id][0].shutdown(msg.reason)
            elif not jobs:
                return EXIT_OK
            else:
                for ctx, _ in jobs.values():
                    ctx.shutdown(msg.reason)
        else:
            print(f"callboard job process: unexpected {type(msg).__name__}", file=sys.stderr)


async def _drain(writer: asyncio.StreamWriter) -> None:
    """Wait until what was written is in the kernel; if the worker is gone meanwhile, the next
    read says so (None) and the process ends as on any hang-up."""
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _run_tagged(
    ctx: RunnableJob, spec: ChildSpec, on_outcome: Callable[[JobOutcome], None]
) -> JobOutcome:
    """Run one job with its ids on every log line written in its tasks (a process may run
    several jobs at once)."""
    fields = ctx.job_fields
    JOB_LOG_FIELDS.set((("job_id", fields["job_id"]), ("room", fields["room"])))
    return await run_job(ctx, spec.entrypoint, spec.shutdown_timeout, on_outcome)


def _outcome_sender(writer: asyncio.StreamWriter, job_id: str) -> Callable[[JobOutcome], None]:
    """Tells the worker a job's outcome as soon as it is known (ipc.JobEnding)."""

    def send(outcome: JobOutcome) -> None:
        if not writer.is_closing():
            writer.write(ipc.encode(ipc.JobEnding(outcome.status, outcome.error, job_id)))

    return send


async def _stop_all(
    jobs: dict[str, tuple[RunnableJob, asyncio.Task[JobOutcome]]], reason: str, timeout: float
) -> None:
    for ctx, _ in jobs.values():
        ctx.shutdown(reason)
    if jobs:
        await asyncio.wait([task for _, task in jobs.values()], timeout=timeout)


REHEARSAL_JOB_ID: Final = "AJ_zygote_rehearsal"


async def _rehearsal_entrypoint(ctx: RunnableJob) -> None:
    ctx.shutdown("rehearsal")


def rehearse(log_level: int) -> None:
    """Run one no-op job through the whole job-process path, in the zygote, before it forks.

    Whatever that path builds lazily, and the interpreter's per-function warm-up and
    specialisation state, is then settled in the zygote's memory and shared by every child,
    instead of being written (and copied page by page) in each one. The user's code does not
    run: the entrypoint is a no-op and there is no prewarm."""
    spec = ChildSpec(_rehearsal_entrypoint, None, log_level, 1.0, os.getpid())
    try:
        with root_logging_kept():
            asyncio.run(_rehearse(spec))
    finally:
        asyncio.set_event_loop_policy(None)


def _rehearsal_start() -> bytes:
    job = agent.Job(id=REHEARSAL_JOB_ID, type=agent.JT_ROOM, room=models.Room(name="rehearsal"))
    info = RunningJobInfo(JobAcceptArguments("", "", ""), job, "ws://127.0.0.1", "", "")
    return ipc.encode(ipc.StartJob.of(info))


async def _rehearse_job_start(shutdown_timeout: float) -> None:
    """A warm process runs a no-op job start (decode, context, runner) while it is idle: the
    pages that path writes are copied from the zygote now, not when a call is waiting."""
    start = ipc.decode(_rehearsal_start())
    assert isinstance(start, ipc.StartJob)
    proc = new_job_process(JobExecutorType.PROCESS)
    ctx = new_job_context(proc, start.running_info(), None)
    await run_job(ctx, _rehearsal_entrypoint, shutdown_timeout)


async def _rehearse(spec: ChildSpec) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    serving = asyncio.ensure_future(_serve(theirs, spec))
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    writer.write(ipc.encode(ipc.Ping(time.time())) + _rehearsal_start())
    while not isinstance(await ipc.read_message(reader), (ipc.JobDone, type(None))):
        pass
    writer.close()
    await serving
    theirs.close()
