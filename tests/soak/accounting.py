"""What "every job accounted for" means in the soak, as pure functions over what the run
recorded: the server's job records (per server epoch), the workers' JSON logs and the agent's
ledger.

A dispatch is *created* when the server answered CreateRoom (with the soak agent in the room's
config) with 200. A created dispatch is *accounted for* when all of these hold:

1. the server epoch (one `callboard server` process lifetime) that created it listed exactly one
   dispatch with exactly one job for its room;
2. its terminal status is known exactly once: either (a) that epoch's record of the job reached
   JS_SUCCESS or JS_FAILED while the epoch lived, or (b) the epoch ended (the server was
   restarted, losing its in-memory records) while the job was not terminal, and exactly one
   worker log has a "job ended" line for the job id with a terminal status;
3. no worker log has two "job ended" lines for it, and the agent's ledger shows at most one start
   (no job ran twice);
4. when both the server record and a worker's "job ended" line exist, they agree on the status.

A created dispatch that is not accounted for is *lost*. Separately, the final status must be the
one its injected fault calls for (`expected_outcome`), or the server's "disconnected and no
MigrateJobRequest" failure for a job on a worker that was SIGKILLed. A cut is no excuse: the
worker claims every job it accepted after reconnecting, including one whose assignment the cut
swallowed (the server sends that assignment again), so each of them ends as its fault says.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from livekit.protocol import agent

TERMINAL: Final = frozenset({agent.JS_SUCCESS, agent.JS_FAILED})
FAULTS: Final = ("none", "raise", "sigkill", "hang", "hog")
WORKER_GONE: Final = "disconnected and no MigrateJobRequest"
EXPECTED: Final[Mapping[str, tuple[int, str]]] = {
    "none": (agent.JS_SUCCESS, ""),
    "raise": (agent.JS_FAILED, "entrypoint raised RuntimeError: injected fault"),
    "sigkill": (agent.JS_FAILED, "killed by SIGKILL"),
    "hang": (agent.JS_FAILED, "unresponsive for"),
    "hog": (agent.JS_FAILED, "over job_memory_limit_mb"),
}


@dataclass(frozen=True)
class FinalStatus:
    """A terminal status and who recorded it."""

    status: int
    error: str
    worker_id: str
    source: str
    """"server" (the epoch's record) or "worker" (a worker's "job ended" line)."""


@dataclass
class DispatchRecord:
    """One created dispatch as the harness saw it."""

    seq: int
    fault: str
    room: str
    epoch: int
    jobs: list[agent.Job] = field(default_factory=list)
    """The jobs of the room's dispatches in the last ListDispatch of its epoch."""
    dispatches: int = 0
    epoch_ended: bool = False
    """The server epoch ended (restart) before this record was terminal."""


@dataclass(frozen=True)
class WorkerEnd:
    job_id: str
    status: int
    error: str
    worker_id: str
    instance: str


def worker_ends(instance: str, lines: Iterable[Mapping[str, Any]]) -> list[WorkerEnd]:
    """The "job ended" lines of one worker process's JSON log."""
    out = []
    for rec in lines:
        if rec.get("message") != "job ended" or rec.get("logger") != "callboard.worker":
            continue
        status_name = str(rec.get("status", ""))
        status = agent.JobStatus.Value(status_name) if status_name in agent.JobStatus.keys() else -1  # noqa: SIM118
        out.append(
            WorkerEnd(
                str(rec.get("job_id", "")),
                status,
                str(rec.get("error", "")),
                str(rec.get("worker_id", "")),
                instance,
            )
        )
    return out


def registered_ids(lines: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every worker id one worker process registered under (one per server session)."""
    return {
        str(rec["worker_id"])
        for rec in lines
        if rec.get("message") == "registered worker" and rec.get("worker_id")
    }


@dataclass
class Accounting:
    """The verdict on every created dispatch."""

    created: int = 0
    by_server: int = 0
    by_worker_log: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    """Final outcome per fault kind: "<fault> -> <status>" counts."""
    worker_gone: int = 0
    """Jobs failed by the server because their worker was SIGKILLed."""

    @property
    def problems(self) -> list[str]:
        return self.lost + self.duplicates + self.disagreements + self.unexpected


def account(
    records: Iterable[DispatchRecord],
    ends: Iterable[WorkerEnd],
    ledger_starts: Mapping[str, int],
    killed_worker_ids: set[str],
) -> Accounting:
    """Apply the definition in this module's docstring to a run."""
    by_job: dict[str, list[WorkerEnd]] = defaultdict(list)
    for end in ends:
        by_job[end.job_id].append(end)
    acc = Accounting()
    for rec in records:
        acc.created += 1
        where = f"job #{rec.seq} ({rec.fault}, room {rec.room!r}, epoch {rec.epoch})"
        if rec.dispatches != 1 or len(rec.jobs) != 1:
            acc.lost.append(f"{where}: {rec.dispatches} dispatches, {len(rec.jobs)} jobs listed")
            continue
        job = rec.jobs[0]
        logged = by_job.get(job.id, [])
        if len(logged) > 1:
            acc.duplicates.append(f"{where} {job.id}: {len(logged)} 'job ended' lines")
        if ledger_starts.get(job.id, 0) > 1:
            acc.duplicates.append(f"{where} {job.id}: started {ledger_starts[job.id]} times")
        final = _final(rec, job, logged)
        if final is None:
            acc.lost.append(
                f"{where} {job.id}: server says {agent.JobStatus.Name(job.state.status)}"
                f"{' (epoch ended)' if rec.epoch_ended else ''}, worker logs "
                f"{[agent.JobStatus.Name(e.status) for e in logged if e.status >= 0]}"
            )
            continue
        if final.source == "server":
            acc.by_server += 1
        else:
            acc.by_worker_log += 1
        for end in logged:
            if final.source == "server" and end.status != final.status:
                acc.disagreements.append(
                    f"{where} {job.id}: server {agent.JobStatus.Name(final.status)}, "
                    f"worker {end.instance} logged {agent.JobStatus.Name(end.status)}"
                )
        acc.outcomes[f"{rec.fault} -> {agent.JobStatus.Name(final.status)}"] += 1
        problem = outcome_problem(rec.fault, final, killed_worker_ids)
        if problem == WORKER_GONE:
            acc.worker_gone += 1
        elif problem is not None:
            acc.unexpected.append(f"{where} {job.id}: {problem}")
    return acc


def _final(rec: DispatchRecord, job: agent.Job, logged: list[WorkerEnd]) -> FinalStatus | None:
    state = job.state
    if state.status in TERMINAL:
        return FinalStatus(state.status, state.error, state.worker_id, "server")
    if not rec.epoch_ended:
        return None
    terminal = [e for e in logged if e.status in TERMINAL]
    if len(terminal) != 1:
        return None
    end = terminal[0]
    return FinalStatus(end.status, end.error, end.worker_id, "worker")


def outcome_problem(fault: str, final: FinalStatus, killed_worker_ids: set[str]) -> str | None:
    """None when `final` is what `fault` calls for; WORKER_GONE for the failure the server
    records when the job's worker is one of `killed_worker_ids` (SIGKILLed); else what is
    wrong."""
    if (
        final.source == "server"
        and final.status == agent.JS_FAILED
        and WORKER_GONE in final.error
        and final.worker_id in killed_worker_ids
    ):
        return WORKER_GONE
    status, text = EXPECTED[fault]
    if final.status != status or text not in final.error or (not text and final.error):
        return (
            f"expected {agent.JobStatus.Name(status)} {text!r}, got "
            f"{agent.JobStatus.Name(final.status)} {final.error[:160]!r} ({final.source})"
        )
    return None


def growth(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Relative growth of a sampled value over [start, end]: the median of the last tenth of
    the window over the median of its first tenth (0.05 = 5 %)."""
    inside = [v for t, v in samples if start <= t <= end]
    if len(inside) < 10:
        return 0.0
    tenth = max(3, len(inside) // 10)
    first = sorted(inside[:tenth])[tenth // 2]
    last = sorted(inside[-tenth:])[tenth // 2]
    return last / first - 1.0
