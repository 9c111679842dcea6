"""Jobs, ours vs livekit-agents 1.8.9, against one `callboard server`: dispatch→entrypoint
latency (single jobs and bursts) and the memory of the worker's process tree.

The agent (`bench/agents/<side>_agent.py`, the two differing only in their import) needs no
media: its entrypoint writes `time.time()` to a file as its first act, then holds the job (a
number of seconds from the job metadata, or until terminated). **Start latency** is that
timestamp minus `time.time()` taken just before the CreateDispatch request is written (both
clocks are this machine's; the room exists, created on the same keep-alive connection), so it
covers the server's dispatch, the worker's offer handling and the job process's start up to
the user's code.

Every worker is fresh, registered, settled (see `bench._side_by_side.settle`) and has run one
untimed job before it is measured. Scenarios, sides alternating which goes first:

- `dev` (dev defaults: no idle process, no load threshold) and `start` with
  `load_threshold=inf` (production defaults otherwise, i.e. the default warm pool), both
  reporting a load of 0 so that the server never refuses them for load ("unlimited"): single
  jobs one after another (the worker settled in between), then bursts of N dispatches written
  at once, one fresh worker per burst run; the jobs of a burst hold until terminated.
- `start`, unlimited, `--memory-jobs` jobs: PSS/USS summed over the worker and every
  descendant, idle and with those jobs running (settled); then again on a fresh worker with
  jobs that each ran a full `gc.collect()` (what a job that has run a while has been through).
- `start` with each side's defaults (load_threshold 0.7 of the machine's CPU, the CPU load
  reported to the server, each side's reservation for offers not yet in the CPU average): the
  same bursts, to report honestly how many each side accepts on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from bench._common import ServerProcess, machine_summary
from bench._side_by_side import (
    REGISTER_TIMEOUT_S,
    SIDES,
    AgentProcess,
    Dispatcher,
    LatencyStats,
    Row,
    ServerLog,
    TreeMemory,
    install_stop,
    median,
    run_bench,
    settle,
    table,
    wait_registered,
)

SINGLE_HOLD_S: Final = 0.2
"""How long a single job runs before its entrypoint calls ctx.shutdown()."""
JOB_START_TIMEOUT_S: Final = 30.0
JOB_END_TIMEOUT_S: Final = 30.0
BURST_TIMEOUT_BASE_S: Final = 30.0
BURST_TIMEOUT_PER_JOB_S: Final = 2.0
SINGLE_TARGET: Final = 0.5
BURST_P99_TARGET_MS: Final = 100.0
BURST_TARGET_SIZE: Final = 50
IDLE_PSS_TARGET: Final = 0.25
DEFAULT_TRIALS: Final = 15
DEFAULT_MEMORY_JOBS: Final = 10
VOICE_TRIALS: Final = 5
VOICE_JOBS: Final = 3
ADDED_USS_TARGET: Final = 0.5


@dataclass(frozen=True)
class Scenario:
    mode: str
    threshold: str | None
    """BENCH_LOAD_THRESHOLD for the agent; None: the framework's default for the mode."""
    zero_load: bool
    """Report a load of 0 (BENCH_ZERO_LOAD): the server then never refuses for load."""
    singles: bool
    memory: bool
    pool: int | None = None
    """BENCH_NUM_IDLE: a warm pool of this size instead of the framework's default."""
    sides: tuple[str, ...] = SIDES

    @property
    def label(self) -> str:
        pool = f", warm pool {self.pool}" if self.pool is not None else ""
        return f"{self.mode}, {'unlimited' if self.unlimited else 'default load'}{pool}"

    @property
    def unlimited(self) -> bool:
        """Neither the worker's threshold nor the server refuses a job for load."""
        return self.zero_load


@dataclass
class Options:
    trials: int = 15
    bursts: tuple[int, ...] = (10, 50)
    burst_runs: int = 1
    memory_jobs: int = 10
    default_threshold: bool = True
    sized_pool: bool = True
    keep_logs: bool = False
    timeout: float = 1200.0
    json: bool = False
    voice: bool = False

    def scenarios(self) -> list[Scenario]:
        out = [
            Scenario("dev", None, True, True, False),
            Scenario("start", "inf", True, True, True),
        ]
        if self.default_threshold:
            out.append(Scenario("start", None, False, False, False))
        if self.sized_pool:
            # ours only: livekit-agents' idle processes weigh ~150 MB PSS each
            out.append(Scenario("start", "inf", True, False, False, max(self.bursts), ("ours",)))
        return out


@dataclass
class SideResult:
    """What one side measured in one scenario."""

    singles_ms: list[float] = field(default_factory=list)
    bursts: dict[int, LatencyStats] = field(default_factory=dict)
    """The representative run of each burst size: the one with the median p99."""
    burst_runs: dict[int, list[LatencyStats]] = field(default_factory=dict)
    machine_busy: dict[int, list[float]] = field(default_factory=dict)
    """Machine CPU use (fraction of all cores) in the second before each burst run."""
    idle: TreeMemory | None = None
    with_jobs: TreeMemory | None = None
    gc_before: TreeMemory | None = None
    gc_with_jobs: TreeMemory | None = None


class JobsBench:
    def __init__(self, opts: Options, server: ServerProcess, workdir: Path) -> None:
        self.opts = opts
        self.server = server
        self.workdir = workdir
        self.log = ServerLog(server)
        self.dispatcher = Dispatcher(server, self.log)
        self.results: dict[tuple[Scenario, str], SideResult] = {}
        self._workers = 0

    async def start_worker(self, side: str, sc: Scenario) -> AgentProcess:
        self._workers += 1
        name = f"jobs-{side}-{sc.mode}-{self._workers}"
        worker = AgentProcess(
            side, sc.mode, self.server, name, self.workdir, sc.threshold, sc.zero_load, sc.pool
        )
        try:
            await wait_registered(self.log, worker, REGISTER_TIMEOUT_S)
            await settle(worker)
            await self.warm_up(worker)
        except BaseException:
            await asyncio.to_thread(worker.stop)
            raise
        return worker

    async def warm_up(self, worker: AgentProcess) -> None:
        """One short job, untimed, so that every measure starts from a worker that has run a
        job (livekit-agents starts its forkserver with the first job when it keeps no idle
        process, as in dev); best effort: a refusal (default load) is not an error."""
        ds = self.dispatcher.prepare(worker, 1, SINGLE_HOLD_S)
        await self.dispatcher.fire(ds)
        await self.dispatcher.wait(worker, ds, JOB_START_TIMEOUT_S)
        await self.dispatcher.wait_ended(worker, ds, JOB_END_TIMEOUT_S)
        await settle(worker)

    async def singles(self, worker: AgentProcess, out: SideResult) -> None:
        for _ in range(self.opts.trials):
            ds = self.dispatcher.prepare(worker, 1, SINGLE_HOLD_S)
            await self.dispatcher.fire(ds)
            await self.dispatcher.wait(worker, ds, JOB_START_TIMEOUT_S)
            stats = LatencyStats.of(ds)
            if stats.started != 1:
                raise RuntimeError(
                    f"{worker.label}: a single job did not start: {stats.refused}\n"
                    f"{worker.log_tail()}"
                )
            out.singles_ms.append(stats.p50_ms)
            await self.dispatcher.wait_ended(worker, ds, JOB_END_TIMEOUT_S)
            await settle(worker)

    async def burst(
        self, worker: AgentProcess, size: int, out: SideResult | None, gc: bool = False
    ) -> LatencyStats:
        """`size` dispatches at once, jobs held until terminated; their start latencies
        (recorded in `out` as the burst figures unless None)."""
        ds = self.dispatcher.prepare(worker, size, None, gc)
        psutil.cpu_percent(interval=None)
        await asyncio.sleep(1.0)
        busy = psutil.cpu_percent(interval=None) / 100.0
        await self.dispatcher.fire(ds)
        timeout = BURST_TIMEOUT_BASE_S + BURST_TIMEOUT_PER_JOB_S * size
        await self.dispatcher.wait(worker, ds, timeout)
        stats = LatencyStats.of(ds)
        if out is not None:
            runs = out.burst_runs.setdefault(size, [])
            runs.append(stats)
            out.machine_busy.setdefault(size, []).append(busy)
            by_p99 = sorted(runs, key=lambda r: (r.count - r.started, r.p99_ms))
            out.bursts[size] = by_p99[(len(by_p99) - 1) // 2]
        print(
            f"  {worker.label:13} burst {size:3}{' (gc)' if gc else ''}: "
            f"started {stats.started}/{stats.count}, p50 {stats.p50_ms:.0f} ms, "
            f"p99 {stats.p99_ms:.0f} ms, max {stats.max_ms:.0f} ms"
            + (f", refused: {stats.refused}" if stats.refused else "")
            + f" (machine CPU before: {busy:.0%})",
            flush=True,
        )
        return stats

    async def memory(self, side: str, sc: Scenario, out: SideResult, gc: bool) -> None:
        """Tree memory idle, then with --memory-jobs jobs running (after a full collection
        in each job if `gc`), on a fresh worker."""
        worker = await self.start_worker(side, sc)
        try:
            before = worker.memory()
            stats = await self.burst(worker, self.opts.memory_jobs, None, gc)
            if stats.started != self.opts.memory_jobs:
                raise RuntimeError(f"{worker.label}: memory jobs did not all start: {stats}")
            await settle(worker)
            after = worker.memory()
        finally:
            await asyncio.to_thread(worker.stop)
        if gc:
            out.gc_before, out.gc_with_jobs = before, after
        else:
            out.idle, out.with_jobs = before, after
        print(
            f"  {worker.label:13} memory{' (gc)' if gc else ''}: idle PSS "
            f"{before.pss_mb:.1f} MB USS {before.uss_mb:.1f} MB ({before.processes} procs), "
            f"with {self.opts.memory_jobs} jobs PSS {after.pss_mb:.1f} MB USS "
            f"{after.uss_mb:.1f} MB ({after.processes} procs)",
            flush=True,
        )

    async def run_side(self, side: str, sc: Scenario) -> SideResult:
        out = SideResult()
        runs = [size for size in self.opts.bursts for _ in range(self.opts.burst_runs)]
        for i, size in enumerate(runs):
            worker = await self.start_worker(side, sc)
            try:
                if i == 0 and sc.pool is not None:
                    out.idle = worker.memory()
                if i == 0 and sc.singles:
                    await self.singles(worker, out)
                    shown = ", ".join(f"{v:.1f}" for v in out.singles_ms)
                    print(f"  {worker.label:13} single jobs: {shown} ms", flush=True)
                await self.burst(worker, size, out)
            finally:
                await asyncio.to_thread(worker.stop)
        if sc.memory:
            await self.memory(side, sc, out, gc=False)
            await self.memory(side, sc, out, gc=True)
        return out

    async def run(self) -> None:
        for k, sc in enumerate(self.opts.scenarios()):
            print(f"scenario: {sc.label}", flush=True)
            for side in sc.sides if k % 2 == 0 else sc.sides[::-1]:
                self.results[(sc, side)] = await self.run_side(side, sc)


def _value(stats: LatencyStats | None, attr: str) -> float:
    return math.nan if stats is None else float(getattr(stats, attr))


def rows(bench: JobsBench) -> list[Row]:
    out: list[Row] = []
    opts = bench.opts
    for sc in opts.scenarios():
        ours = bench.results[(sc, "ours")]
        theirs = bench.results.get((sc, "theirs"), SideResult())
        if sc.singles:
            out.append(
                Row(
                    f"single job start, {sc.label} (median of {opts.trials})",
                    median(ours.singles_ms),
                    median(theirs.singles_ms),
                    "ms",
                    target=SINGLE_TARGET,
                )
            )
        for size in opts.bursts:
            out += burst_rows(
                sc, size, ours.bursts.get(size), theirs.bursts.get(size), opts.burst_runs
            )
        if sc.memory:
            out += memory_rows(ours, theirs, opts.memory_jobs)
        if sc.pool is not None:
            theirs_default = next(
                (r for (s, side), r in bench.results.items() if s.memory and side == "theirs"),
                None,
            )
            theirs_idle = theirs_default.idle if theirs_default is not None else None
            out.append(
                Row(
                    f"idle tree PSS, ours with a warm pool of {sc.pool} (theirs: default pool)",
                    _mem(ours.idle, "pss_mb"),
                    _mem(theirs_idle, "pss_mb"),
                    "MB",
                )
            )
    return out


def burst_rows(
    sc: Scenario,
    size: int,
    ours: LatencyStats | None,
    theirs: LatencyStats | None,
    runs: int,
) -> list[Row]:
    which = f" (run with the median p99 of {runs})" if runs > 1 else ""
    out = [
        Row(
            f"burst {size}, {sc.label}{which}: jobs started",
            _value(ours, "started"),
            _value(theirs, "started"),
            "count",
            absolute_target=f"all {size} (ours)" if sc.unlimited else "",
            absolute_met=ours is not None and ours.started == size,
        )
    ]
    for attr, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        check = attr == "p99_ms" and sc.unlimited and size == BURST_TARGET_SIZE
        out.append(
            Row(
                f"burst {size}, {sc.label}: start {name}",
                _value(ours, attr),
                _value(theirs, attr),
                "ms",
                absolute_target=f"<= {BURST_P99_TARGET_MS:g} ms (ours)" if check else "",
                absolute_met=check and _value(ours, attr) <= BURST_P99_TARGET_MS,
            )
        )
    return out


def _added_uss(before: TreeMemory | None, after: TreeMemory | None, jobs: int) -> float:
    if before is None or after is None:
        return math.nan
    return (after.uss_mb - before.uss_mb) / jobs


def _mem(m: TreeMemory | None, attr: str) -> float:
    return math.nan if m is None else float(getattr(m, attr))


def memory_rows(ours: SideResult, theirs: SideResult, jobs: int) -> list[Row]:
    return [
        Row(
            "idle tree PSS (start, default pool)",
            _mem(ours.idle, "pss_mb"),
            _mem(theirs.idle, "pss_mb"),
            "MB",
            target=IDLE_PSS_TARGET,
        ),
        Row("idle tree USS", _mem(ours.idle, "uss_mb"), _mem(theirs.idle, "uss_mb"), "MB"),
        Row(
            "idle tree processes",
            _mem(ours.idle, "processes"),
            _mem(theirs.idle, "processes"),
            "count",
        ),
        Row(
            f"tree PSS with {jobs} jobs running",
            _mem(ours.with_jobs, "pss_mb"),
            _mem(theirs.with_jobs, "pss_mb"),
            "MB",
        ),
        Row(
            "added USS per running job",
            _added_uss(ours.idle, ours.with_jobs, jobs),
            _added_uss(theirs.idle, theirs.with_jobs, jobs),
            "MB",
            target=ADDED_USS_TARGET,
        ),
        Row(
            f"tree PSS with {jobs} jobs, each after a full gc.collect()",
            _mem(ours.gc_with_jobs, "pss_mb"),
            _mem(theirs.gc_with_jobs, "pss_mb"),
            "MB",
        ),
        Row(
            "added USS per running job, after a full gc.collect()",
            _added_uss(ours.gc_before, ours.gc_with_jobs, jobs),
            _added_uss(theirs.gc_before, theirs.gc_with_jobs, jobs),
            "MB",
            target=ADDED_USS_TARGET,
        ),
    ]


def dump(bench: JobsBench) -> str:
    out: dict[str, Any] = {}
    for (sc, side), res in bench.results.items():
        out[f"{sc.label}/{side}"] = {
            "singles_ms": res.singles_ms,
            "bursts": {k: [asdict(r) for r in v] for k, v in res.burst_runs.items()},
            "machine_busy": res.machine_busy,
            **{
                k: asdict(m) if m is not None else None
                for k, m in (
                    ("idle", res.idle),
                    ("with_jobs", res.with_jobs),
                    ("gc_before", res.gc_before),
                    ("gc_with_jobs", res.gc_with_jobs),
                )
            },
        }
    return json.dumps(out)


async def run(opts: Options) -> JobsBench:
    install_stop(asyncio.current_task())  # type: ignore[arg-type]
    workdir = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    server = ServerProcess(log_level="INFO")
    server.start()
    bench = JobsBench(opts, server, workdir)
    try:
        async with asyncio.timeout(opts.timeout):
            await bench.run()
    finally:
        await asyncio.to_thread(server.stop)
        if opts.keep_logs:
            shutil.copy(server.log_path, workdir / "server.log")
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        server.log_path.unlink(missing_ok=True)
    return bench


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--trials", type=int, default=DEFAULT_TRIALS, help="single jobs per side and mode (15)"
    )
    p.add_argument("--bursts", default="10,50", help="burst sizes, comma-separated (10,50)")
    p.add_argument(
        "--burst-runs",
        type=int,
        default=1,
        help="runs of each burst, each on a fresh worker; the run with the median p99 is "
        "reported (default 1)",
    )
    p.add_argument(
        "--memory-jobs",
        type=int,
        default=DEFAULT_MEMORY_JOBS,
        help="jobs running for the memory figure (10)",
    )
    p.add_argument(
        "--keep-logs", action="store_true", help="keep worker logs and job records (path printed)"
    )
    p.add_argument(
        "--no-default-threshold",
        action="store_true",
        help="skip the bursts with the default production load_threshold",
    )
    p.add_argument(
        "--no-sized-pool",
        action="store_true",
        help="skip the bursts (ours only) with a warm pool as large as the largest burst",
    )
    p.add_argument(
        "--timeout", type=float, default=1200.0, help="overall limit in seconds (default 1200)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 single jobs, one burst of 5, 5 jobs"
    )
    p.add_argument("--json", action="store_true", help="also print every measure as JSON")
    p.add_argument(
        "--voice",
        action="store_true",
        help="instead: the voice agent (examples/receptionist.py) on the real livekit-server, "
        "in a private network namespace (root; see bench/voice.py); --trials default 5, "
        "--memory-jobs default 3",
    )
    a = p.parse_args(argv)
    try:
        bursts = tuple(int(x) for x in a.bursts.split(",") if x.strip())
    except ValueError:
        p.error("--bursts must be comma-separated integers")
    opts = Options(
        trials=a.trials,
        bursts=bursts,
        burst_runs=a.burst_runs,
        memory_jobs=a.memory_jobs,
        default_threshold=not a.no_default_threshold,
        sized_pool=not a.no_sized_pool,
        keep_logs=a.keep_logs,
        timeout=a.timeout,
        json=a.json,
        voice=a.voice,
    )
    if a.voice:
        opts.trials = a.trials if a.trials != DEFAULT_TRIALS else VOICE_TRIALS
        opts.memory_jobs = a.memory_jobs if a.memory_jobs != DEFAULT_MEMORY_JOBS else VOICE_JOBS
    if a.quick:
        opts.trials, opts.bursts, opts.memory_jobs = 2, (5,), 5
    if opts.trials < 1 or not opts.bursts or min(opts.bursts) < 1:
        p.error("--trials and --bursts must be at least 1")
    if opts.memory_jobs < 1 or opts.burst_runs < 1:
        p.error("--memory-jobs and --burst-runs must be at least 1")
    if opts.timeout <= 0:
        p.error("--timeout must be > 0")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.voice:
        from bench import voice

        print(f"{time.strftime('%Y-%m-%d %H:%M')}, {machine_summary()}")
        return voice.main(opts.trials, opts.memory_jobs, opts.json)
    started = time.strftime("%Y-%m-%d %H:%M")
    bench = run_bench("jobs", run(opts), opts.timeout)
    if bench is None:
        return 1
    print(f"\n{started}, {machine_summary()}\n")
    print(table(rows(bench)))
    if opts.json:
        print(dump(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
