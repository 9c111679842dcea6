"""Dispatch throughput and latency of `callboard server`: K simulated workers × M dispatches.

The server runs in its own process (`callboard --log-level WARNING server`); the simulated
workers (`callboard.simworker`, the real /agent protocol) and the dispatching client run here.
The client posts protobuf `AgentDispatchService/CreateDispatch` requests with pre-minted tokens
(the server still verifies each one), keeping `--concurrency` dispatches outstanding. A dispatch
is outstanding from just before its request is sent until a worker has received its
JobAssignment and sent JS_RUNNING; that span is the latency. Jobs carry `bench:<n>` as metadata,
which is how a worker's assignment is matched to its dispatch.

At the end every dispatch must have reached JS_RUNNING at exactly one worker, the worker must
have reported its end, and the server's record (ListDispatch over every room) must show the job
JS_SUCCESS on that worker: anything else counts as lost.

    python -m bench.server_dispatch [--workers 10] [--jobs 5000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from livekit import api
from livekit.protocol import agent, agent_dispatch, room

from bench._common import (
    LOOPBACK,
    CpuSnapshot,
    HttpConnection,
    ServerProcess,
    http_request,
    machine_summary,
    percentile,
)
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET
from callboard.simworker import SimJob, SimWorker

AGENT_NAME: Final = "bench"
METADATA_PREFIX: Final = "bench:"
WARMUP_METADATA: Final = "warmup"
DISPATCH_PATH: Final = "/twirp/livekit.AgentDispatchService/CreateDispatch"
LIST_PATH: Final = "/twirp/livekit.AgentDispatchService/ListDispatch"
CREATE_ROOM_PATH: Final = "/twirp/livekit.RoomService/CreateRoom"
PROTOBUF: Final = "application/protobuf"
# How long one dispatch may take to reach JS_RUNNING before it counts as lost.
JOB_TIMEOUT_S: Final = 30.0
# How long, after the last dispatch, the jobs have to report their end (plus --job-seconds).
DRAIN_TIMEOUT_S: Final = 30.0
TARGET_JOBS_PER_S: Final = 2000.0
TARGET_P99_MS: Final = 20.0


@dataclass
class Options:
    workers: int = 10
    jobs: int = 5000
    concurrency: int = 50
    rooms: int = 50
    job_seconds: float = 0.0
    timeout: float = 300.0
    runs: int = 1
    profile: Path | None = None
    server_uvloop: bool = False
    client_uvloop: bool = False
    json: bool = False


@dataclass
class Result:
    workers: int
    jobs: int
    concurrency: int
    rooms: int
    job_seconds: float
    wall_s: float
    jobs_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    lost_detail: dict[str, int]
    server_cpu_s: float
    client_cpu_s: float
    other_cpu_s: float
    server_log_lines: int
    server_uvloop: bool
    client_uvloop: bool
    machine: str = field(default_factory=machine_summary)

    @property
    def server_cpu_pct(self) -> float:
        return 100.0 * self.server_cpu_s / self.wall_s

    @property
    def client_cpu_pct(self) -> float:
        return 100.0 * self.client_cpu_s / self.wall_s

    @property
    def other_cpu_pct(self) -> float:
        return 100.0 * self.other_cpu_s / self.wall_s

    @property
    def server_us_per_job(self) -> float:
        return 1e6 * self.server_cpu_s / self.jobs

    @property
    def target_met(self) -> bool:
        return (
            self.lost == 0 and self.jobs_per_s >= TARGET_JOBS_PER_S and self.p99_ms < TARGET_P99_MS
        )

    def one_line(self) -> str:
        return (
            f"{self.jobs_per_s:,.0f} jobs/s, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
            f"max {self.max_ms:.1f} ms, lost {self.lost}, cpu server {self.server_cpu_pct:.0f}% "
            f"({self.server_us_per_job:.0f} us/job) client {self.client_cpu_pct:.0f}% "
            f"other {self.other_cpu_pct:.0f}%"
        )

    def report(self) -> str:
        lost = ", ".join(f"{k}={v}" for k, v in self.lost_detail.items() if v) or "none"
        return "\n".join(
            [
                f"server_dispatch: {self.workers} workers x {self.jobs} dispatches, "
                f"{self.concurrency} in flight, {self.rooms} rooms, job {self.job_seconds:g}s",
                f"  machine      {self.machine}",
                f"  event loop   server {'uvloop' if self.server_uvloop else 'asyncio'}, "
                f"client {'uvloop' if self.client_uvloop else 'asyncio'}",
                f"  throughput   {self.jobs_per_s:,.0f} jobs/s "
                f"({self.jobs} in {self.wall_s:.2f}s, dispatch -> JS_RUNNING)",
                f"  latency ms   p50 {self.p50_ms:.2f}  p90 {self.p90_ms:.2f}  "
                f"p99 {self.p99_ms:.2f}  max {self.max_ms:.2f}",
                f"  lost         {self.lost} ({lost})",
                f"  cpu          server {self.server_cpu_s:.2f}s ({self.server_cpu_pct:.0f}% "
                f"of a core, {self.server_us_per_job:.0f} us/job), bench client+workers "
                f"{self.client_cpu_s:.2f}s ({self.client_cpu_pct:.0f}%), other processes "
                f"{self.other_cpu_s:.2f}s ({self.other_cpu_pct:.0f}%)",
                f"  server log   {self.server_log_lines} line(s) at WARNING and above",
                f"  target       >= {TARGET_JOBS_PER_S:,.0f} jobs/s, p99 < {TARGET_P99_MS:g} ms, "
                f"0 lost: {'met' if self.target_met else 'MISSED'}",
            ]
        )


def _token(**grants: object) -> str:
    return (
        api.AccessToken(DEV_API_KEY, DEV_API_SECRET)
        .with_grants(api.VideoGrants(**grants))  # type: ignore[arg-type]
        .to_jwt()
    )


def _room_name(i: int) -> str:
    return f"bench-room-{i:04d}"


class Bench:
    """One run: workers registered, rooms created, dispatches sent, everything checked."""

    def __init__(self, opts: Options, server: ServerProcess) -> None:
        self.opts = opts
        self.server = server
        self.sims: list[SimWorker] = []
        # seq -> future set to the perf_counter() at which a worker sent JS_RUNNING
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.assigned: dict[int, list[tuple[str, str]]] = {}  # seq -> [(job_id, worker_id)]
        self.warmup_assigned = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.room_tokens = [_token(room_admin=True, room=_room_name(i)) for i in range(opts.rooms)]
        self.http: aiohttp.ClientSession | None = None

    # -- workers ------------------------------------------------------------------------------

    def _on_assignment(self, worker: SimWorker, sim: SimJob) -> None:
        now = time.perf_counter()
        meta = sim.job.metadata
        if not meta.startswith(METADATA_PREFIX):
            self.warmup_assigned += 1
            return
        seq = int(meta[len(METADATA_PREFIX) :])
        self.assigned.setdefault(seq, []).append((sim.job.id, worker.worker_id))
        fut = self.pending.get(seq)
        if fut is not None and not fut.done():
            fut.set_result(now)

    async def start_workers(self) -> None:
        for _ in range(self.opts.workers):
            sim = SimWorker(
                self.server.ws_url,
                DEV_API_KEY,
                DEV_API_SECRET,
                agent_name=AGENT_NAME,
                job_seconds=self.opts.job_seconds,
            )
            sim.on_assignment = lambda job, w=sim: self._on_assignment(w, job)
            self.sims.append(sim)
        await asyncio.gather(*(s.start() for s in self.sims))

    def finished_count(self) -> int:
        return sum(len(s.finished) for s in self.sims)

    # -- client -------------------------------------------------------------------------------

    async def _post(self, path: str, token: str, body: bytes) -> bytes:
        assert self.http is not None
        async with self.http.post(
            self.server.http_url + path,
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": PROTOBUF},
        ) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:200]!r}")
            return data

    async def create_rooms(self) -> None:
        """One room per `--rooms`, each dispatching a warm-up job through the same path."""
        token = _token(room_create=True)
        for i in range(self.opts.rooms):
            req = room.CreateRoomRequest(
                name=_room_name(i),
                agents=[
                    agent_dispatch.RoomAgentDispatch(
                        agent_name=AGENT_NAME, metadata=WARMUP_METADATA
                    )
                ],
            )
            await self._post(CREATE_ROOM_PATH, token, req.SerializeToString())

    def _dispatch_request(self, seq: int, metadata: str) -> bytes:
        room_index = seq % self.opts.rooms
        body = agent_dispatch.CreateAgentDispatchRequest(
            agent_name=AGENT_NAME, room=_room_name(room_index), metadata=metadata
        ).SerializeToString()
        headers = {
            "Authorization": f"Bearer {self.room_tokens[room_index]}",
            "Content-Type": PROTOBUF,
        }
        return http_request(LOOPBACK, self.server.port, DISPATCH_PATH, body, headers)

    async def warm_up(self, conns: list[HttpConnection]) -> None:
        """One untimed dispatch on each connection, so that the timed phase starts warm."""
        before = self.warmup_assigned
        for i, conn in enumerate(conns):
            status, data = await conn.request(self._dispatch_request(i, WARMUP_METADATA))
            if status != 200:
                raise RuntimeError(f"warm-up dispatch: HTTP {status}: {data[:200]!r}")
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while self.warmup_assigned - before < len(conns):
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up dispatches did not reach the workers")
            await asyncio.sleep(0.01)

    async def _dispatcher(
        self, conn: HttpConnection, next_seq: list[int], requests: list[bytes]
    ) -> None:
        loop = asyncio.get_running_loop()
        while next_seq[0] < len(requests):
            seq = next_seq[0]
            next_seq[0] += 1
            fut: asyncio.Future[float] = loop.create_future()
            self.pending[seq] = fut
            t0 = time.perf_counter()
            try:
                status, data = await conn.request(requests[seq])
                if status != 200:
                    self.errors[f"http_{status}"] += 1
                    continue
                agent_dispatch.AgentDispatch.FromString(data)
                t1 = await asyncio.wait_for(fut, JOB_TIMEOUT_S)
            except TimeoutError:
                self.errors["no_js_running_in_time"] += 1
                continue
            except ConnectionError as e:
                self.errors[f"connection_{type(e).__name__}"] += 1
                conn.close()
                conn = await HttpConnection.open(LOOPBACK, self.server.port)
                continue
            finally:
                self.pending.pop(seq, None)
            self.latencies.append(t1 - t0)
        conn.close()

    async def dispatch_all(self) -> tuple[float, float, float, float]:
        """Send every dispatch, `--concurrency` at a time, each dispatcher on its own
        keep-alive connection (opened and warmed up before the clock starts).

        Returns the wall time and the CPU seconds used meanwhile by the server, by this process
        and by every other process on the machine (a busy machine skews the figures).
        """
        requests = [
            self._dispatch_request(seq, f"{METADATA_PREFIX}{seq}") for seq in range(self.opts.jobs)
        ]
        conns = [
            await HttpConnection.open(LOOPBACK, self.server.port)
            for _ in range(self.opts.concurrency)
        ]
        await self.warm_up(conns)
        next_seq = [0]
        pids = (self.server.pid, os.getpid())
        # A full collection here scans every object of this process (~15 ms): keep the client's
        # own pauses out of the server's latency. The server runs with its defaults.
        gc.collect()
        gc.freeze()
        cpu0 = CpuSnapshot.take(*pids)
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(self._dispatcher(c, next_seq, requests) for c in conns))
        finally:
            wall = time.perf_counter() - t0
            gc.unfreeze()
        used, other = CpuSnapshot.take(*pids).since(cpu0)
        return wall, used[pids[0]], used[pids[1]], other

    # -- checks -------------------------------------------------------------------------------

    async def wait_drained(self, expected: int) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + self.opts.job_seconds
        # The workers keep counts rather than signal, so poll them (outside the timed phase).
        while self.finished_count() < expected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def verify(self) -> dict[str, int]:
        """Why each lost dispatch is lost; all zeros when every job ran and ended."""
        lost: Counter[str] = Counter()
        worker_ids = {s.worker_id for s in self.sims}
        finished = {job_id for s in self.sims for job_id in s.finished}
        seen: set[int] = set()
        for i in range(self.opts.rooms):
            req = agent_dispatch.ListAgentDispatchRequest(room=_room_name(i))
            data = await self._post(LIST_PATH, self.room_tokens[i], req.SerializeToString())
            resp = agent_dispatch.ListAgentDispatchResponse.FromString(data)
            for d in resp.agent_dispatches:
                if d.metadata == WARMUP_METADATA:
                    continue
                seq = int(d.metadata[len(METADATA_PREFIX) :])
                seen.add(seq)
                got = self.assigned.get(seq, [])
                if not got:
                    lost["never_running_at_a_worker"] += 1
                elif len(got) > 1:
                    lost["assigned_more_than_once"] += 1
                elif len(d.state.jobs) != 1:
                    lost["server_job_count_not_1"] += 1
                else:
                    job = d.state.jobs[0]
                    job_id, worker_id = got[0]
                    if job.id != job_id or job.state.worker_id != worker_id:
                        lost["server_record_mismatch"] += 1
                    elif worker_id not in worker_ids:
                        lost["unknown_worker"] += 1
                    elif job.state.status != agent.JS_SUCCESS or not job.state.ended_at:
                        lost["server_not_js_success"] += 1
                    elif job_id not in finished:
                        lost["worker_never_reported_end"] += 1
        lost["missing_from_list_dispatch"] = self.opts.jobs - len(seen)
        # Failures the dispatchers saw are already counted above (their job never ran).
        return dict(lost)

    async def run(self) -> Result:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.opts.concurrency + 4),
        )
        try:
            await self.start_workers()
            await self.create_rooms()
            await self.wait_drained(self.opts.rooms)
            if self.warmup_assigned != self.opts.rooms:
                raise RuntimeError(
                    f"warm-up: {self.warmup_assigned}/{self.opts.rooms} jobs reached a worker"
                )
            wall, server_cpu, client_cpu, other_cpu = await self.dispatch_all()
            await self.wait_drained(self.opts.rooms + self.opts.concurrency + self.opts.jobs)
            lost_detail = await self.verify()
            for k, v in self.errors.items():
                lost_detail[f"client_saw_{k}"] = v
        finally:
            for s in self.sims:
                with contextlib.suppress(Exception):
                    await s.aclose()
            await self.http.close()
        lat = sorted(self.latencies)
        lost = sum(v for k, v in lost_detail.items() if not k.startswith("client_saw_"))
        return Result(
            workers=self.opts.workers,
            jobs=self.opts.jobs,
            concurrency=self.opts.concurrency,
            rooms=self.opts.rooms,
            job_seconds=self.opts.job_seconds,
            wall_s=wall,
            jobs_per_s=self.opts.jobs / wall,
            p50_ms=percentile(lat, 50) * 1000,
            p90_ms=percentile(lat, 90) * 1000,
            p99_ms=percentile(lat, 99) * 1000,
            max_ms=(lat[-1] if lat else float("nan")) * 1000,
            lost=lost,
            lost_detail=lost_detail,
            server_cpu_s=server_cpu,
            client_cpu_s=client_cpu,
            other_cpu_s=other_cpu,
            server_log_lines=self.server.log_lines(),
            server_uvloop=self.opts.server_uvloop,
            client_uvloop=self.opts.client_uvloop,
        )


async def run_bench(opts: Options) -> Result:
    """One run against a fresh server process, which is stopped (by PID) whatever happens."""
    server = ServerProcess(profile=opts.profile, uvloop=opts.server_uvloop)
    server.start()
    try:
        return await Bench(opts, server).run()
    finally:
        code = await asyncio.to_thread(server.stop)
        if code not in (0, None):
            print(f"server exited with {code}:\n{server.log_tail()}", file=sys.stderr)
        server.log_path.unlink(missing_ok=True)


async def run_all(opts: Options) -> list[Result]:
    """`--runs` runs, each on a fresh server, all within `--timeout`."""
    results: list[Result] = []
    async with asyncio.timeout(opts.timeout):
        for i in range(opts.runs):
            result = await run_bench(opts)
            results.append(result)
            if opts.runs > 1:
                print(f"run {i + 1}/{opts.runs}: {result.one_line()}", flush=True)
    return results


def print_profile(path: Path, limit: int = 40) -> None:
    import pstats

    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.server_dispatch", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workers", type=int, default=10, help="simulated workers K (default 10)")
    p.add_argument("--jobs", type=int, default=5000, help="dispatches M (default 5000)")
    p.add_argument(
        "--concurrency", type=int, default=50, help="dispatches outstanding at once (default 50)"
    )
    p.add_argument(
        "--rooms", type=int, default=50, help="rooms the dispatches are spread over (default 50)"
    )
    p.add_argument(
        "--job-seconds", type=float, default=0.0, help="how long each job runs (default 0)"
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="overall limit in seconds (default 300)"
    )
    p.add_argument(
        "--runs", type=int, default=1, help="repeat on a fresh server; report the median run"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 4 workers, 500 jobs, 20 in flight"
    )
    p.add_argument("--profile", type=Path, help="cProfile the server into this file and print it")
    p.add_argument("--server-uvloop", action="store_true", help="run the server on uvloop")
    p.add_argument("--client-uvloop", action="store_true", help="run this process on uvloop")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    a = p.parse_args(argv)
    opts = Options(
        workers=a.workers,
        jobs=a.jobs,
        concurrency=a.concurrency,
        rooms=a.rooms,
        job_seconds=a.job_seconds,
        timeout=a.timeout,
        runs=a.runs,
        profile=a.profile,
        server_uvloop=a.server_uvloop,
        client_uvloop=a.client_uvloop,
        json=a.json,
    )
    if a.quick:
        opts.workers, opts.jobs, opts.concurrency, opts.rooms = 4, 500, 20, 10
    if min(opts.workers, opts.jobs, opts.concurrency, opts.rooms, opts.runs) < 1:
        p.error("--workers, --jobs, --concurrency, --rooms and --runs must be at least 1")
    if opts.profile is not None and opts.runs != 1:
        p.error("--profile needs --runs 1")
    if opts.job_seconds < 0 or opts.timeout <= 0:
        p.error("--job-seconds must be >= 0 and --timeout > 0")
    if opts.profile is not None and opts.server_uvloop:
        p.error("--profile and --server-uvloop cannot be combined")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # The public dev secret is short by design; pyjwt would warn on every token.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    if opts.client_uvloop:
        import uvloop

        uvloop.install()
    try:
        results = asyncio.run(run_all(opts))
    except TimeoutError:
        print(f"server_dispatch: did not finish within {opts.timeout:g}s", file=sys.stderr)
        return 1
    median = sorted(results, key=lambda r: r.jobs_per_s)[(len(results) - 1) // 2]
    if len(results) > 1:
        print(f"median of {len(results)} runs by throughput:")
    print(median.report())
    if opts.json:
        for r in results:
            print(json.dumps({**asdict(r), "target_met": r.target_met}))
    if opts.profile is not None:
        print_profile(opts.profile)
    clean = all(
        r.lost == 0 and not any(k.startswith("client_saw_") for k in r.lost_detail) for r in results
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
