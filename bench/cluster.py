"""The fleet on a real livekit-server cluster: 2 nodes (v1.13.5, multi-node on one Redis, as
tests/cluster builds them), ours vs livekit-agents 1.8.9 workers on it at once, then a rolling
restart of our fleet under calls.

- **Dispatch**: each side runs `--workers` workers (`bench/agents/<side>_agent.py start`, the
  two scripts differing only in their import; load reported as 0 and no load threshold, so that
  neither is refused for this shared machine's CPU), half registered on each node. Each round
  fires `--burst` CreateDispatch requests at once, alternately through each node's API, for one
  side then the other (the order alternating by round). Start latency: the entrypoint's first
  `time.time()` minus the time taken just before the request; throughput: dispatches over the
  time from the first request to the last entrypoint start.
- **Rolling restart** (ours): the scenario of tests/cluster/test_rolling_restart.py, with its
  figures: calls placed, started, lost, cut short, longest wait for a call's job to start.

    python -m bench.cluster [--workers 4] [--burst 20] [--rounds 3]

Needs Go (livekit-server is built into ~/.cache on first use) and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from livekit import api

from bench._common import machine_summary, percentile
from bench._side_by_side import SIDES, AgentProcess, Row, run_bench, table
from tests.cluster.cluster import Cluster, running_cluster
from tests.cluster.fleet import Caller, Fleet, outcome
from tests.interop.livekit_server import API_KEY, API_SECRET

NODES: Final = 2
REGISTER_TIMEOUT_S: Final = 90.0
START_TIMEOUT_S: Final = 60.0
HOLD_S: Final = 1.0
ROLL_HOMES: Final = (0, 1, 0)
ROLL_RATE: Final = 5.0
ROLL_CALL_S: Final = 2.0
ROLL_MAX_JOBS: Final = 20
TIMEOUT_S: Final = 900.0


async def registered(cluster: Cluster, name: str, count: int) -> None:
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while True:
        seen = sum(
            1
            for n in cluster.nodes
            for r in n.log_records("worker registered")
            if r.get("agentName") == name
        )
        if seen >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {seen} of {count} workers registered")
        await asyncio.sleep(0.1)


def start_records(workers: list[AgentProcess]) -> dict[str, float]:
    """metadata → entrypoint start time, over every worker of a side."""
    return {r["metadata"]: float(r["time"]) for w in workers for r in w.records()}


async def burst(
    clients: list[api.LiveKitAPI], name: str, workers: list[AgentProcess], tag: str, size: int
) -> dict[str, float]:
    """`size` dispatches at once; figures from their entrypoints' start times."""
    sent: dict[str, float] = {}

    async def one(k: int) -> None:
        meta = json.dumps({"hold": HOLD_S, "tag": tag, "n": k})
        sent[meta] = time.time()
        await clients[k % len(clients)].agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=name, room=f"{tag}-{k}", metadata=meta)
        )

    await asyncio.gather(*(one(k) for k in range(size)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        started = start_records(workers)
        if all(m in started for m in sent):
            break
        await asyncio.sleep(0.05)
    started = start_records(workers)
    lat = sorted((started[m] - t) * 1000 for m, t in sent.items() if m in started)
    last = max((started[m] for m in sent if m in started), default=math.nan)
    return {
        "started": len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "per_s": len(lat) / (last - min(sent.values())) if lat else math.nan,
    }


async def dispatch_figures(
    cluster: Cluster, workdir: Path, workers: int, size: int, rounds: int
) -> list[Row]:
    fleets: dict[str, list[AgentProcess]] = {}
    try:
        for side in SIDES:
            fleets[side] = [
                AgentProcess(
                    side,
                    "start",
                    cluster.nodes[i % NODES].server,  # type: ignore[arg-type]
                    f"{side}-cluster",
                    _mkdir(workdir / side / f"w{i}"),
                    load_threshold="inf",
                    zero_load=True,
                )
                for i in range(workers)
            ]
        for side in SIDES:
            await registered(cluster, f"{side}-cluster", workers)
        clients = [api.LiveKitAPI(n.http_url, API_KEY, API_SECRET) for n in cluster.nodes]
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        try:
            for side in SIDES:  # one untimed job per worker's first offer
                await burst(clients, f"{side}-cluster", fleets[side], f"{side}-warm", workers)
            for r in range(rounds):
                order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
                for side in order:
                    tag = f"{side}-r{r}"
                    runs[side].append(
                        await burst(clients, f"{side}-cluster", fleets[side], tag, size)
                    )
                    await asyncio.sleep(HOLD_S + 1)
        finally:
            for c in clients:
                await c.aclose()
    finally:
        for ws in fleets.values():
            for w in ws:
                w.stop()

    def mid(side: str, key: str) -> float:
        values = sorted(run[key] for run in runs[side])
        return values[len(values) // 2] if values else math.nan

    label = f"{workers} workers on {NODES} nodes, bursts of {size}"
    return [
        Row(
            f"started of {size} ({label})",
            mid("ours", "started"),
            mid("theirs", "started"),
            "count",
        ),
        Row(
            "dispatch throughput (median of rounds)",
            mid("ours", "per_s"),
            mid("theirs", "per_s"),
            "/s",
        ),
        Row(
            "start latency p50 (median of rounds)",
            mid("ours", "p50_ms"),
            mid("theirs", "p50_ms"),
            "ms",
        ),
        Row(
            "start latency p99 (median of rounds)",
            mid("ours", "p99_ms"),
            mid("theirs", "p99_ms"),
            "ms",
        ),
    ]


async def roll_figures(cluster: Cluster, workdir: Path) -> dict[str, Any]:
    fleet = Fleet(cluster, _mkdir(workdir / "roll"), max_jobs=ROLL_MAX_JOBS)
    caller = Caller(cluster.nodes, prefix="roll")
    try:
        workers = [fleet.start(f"w{i}", home=h) for i, h in enumerate(ROLL_HOMES)]
        for w in workers:
            await fleet.registered(w)
        stop = asyncio.Event()
        placing = asyncio.create_task(caller.place_until(stop, ROLL_RATE, ROLL_CALL_S))
        await asyncio.sleep(ROLL_CALL_S)
        rolled_at = time.monotonic()
        codes = await fleet.roll(workers, ROLL_HOMES, 60.0)
        roll_s = time.monotonic() - rolled_at
        await asyncio.sleep(ROLL_CALL_S)
        stop.set()
        await placing
        await asyncio.sleep(ROLL_CALL_S + 3)
        result = outcome(caller.calls, fleet.records())
        waits = sorted(
            result.started[c.dispatch_id]["time"] - c.sent_at
            for c in caller.calls
            if c.dispatch_id in result.started
        )
        return {
            "workers rolled": len(codes),
            "exit codes": codes,
            "roll duration s": round(roll_s, 1),
            "calls placed": result.placed,
            "rate /s": round(
                result.placed / (caller.calls[-1].sent_at - caller.calls[0].sent_at), 2
            ),
            "started": len(result.started),
            "completed": len(result.done),
            "lost": result.lost,
            "cut short": len(result.cut_short),
            "max wait for a job s": round(waits[-1], 3) if waits else math.nan,
            "p99 wait s": round(percentile(waits, 99), 3) if waits else math.nan,
        }
    finally:
        await caller.aclose()
        fleet.stop_all()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    async with asyncio.timeout(TIMEOUT_S):
        with running_cluster(workdir / "cluster", NODES) as cluster:
            rows = await dispatch_figures(cluster, workdir, args.workers, args.burst, args.rounds)
            roll = await roll_figures(cluster, workdir)
    print(machine_summary())
    print(f"livekit-server v1.13.5, {NODES} nodes on one Redis; logs in {workdir}\n")
    print(table(rows))
    print("\nrolling restart (ours):")
    for key, value in roll.items():
        print(f"- {key}: {value}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4, help="workers per side (half per node)")
    p.add_argument("--burst", type=int, default=20, help="dispatches fired at once")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_bench("bench.cluster", main(parse(sys.argv[1:])), TIMEOUT_S)
