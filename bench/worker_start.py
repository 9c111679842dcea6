"""Worker start → registered, ours vs livekit-agents 1.8.9, against one `callboard server`.

Each run spawns `python bench/agents/<side>_agent.py <mode>` (the same agent, differing only in
its import) and measures from just before the spawn to the server logging "worker registered"
for that worker's unique agent name (the server's own timestamp, ms resolution). Runs alternate
ours/theirs (and which goes first), each worker is stopped by PID before the next one starts,
and the median per side and mode is reported with the ratio ours/theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench._common import ServerProcess, machine_summary
from bench._side_by_side import (
    MODES,
    REGISTER_TIMEOUT_S,
    SIDES,
    AgentProcess,
    Row,
    ServerLog,
    install_stop,
    median,
    run_bench,
    table,
    wait_registered,
)

TARGET_RATIO: Final = 0.5
PAUSE_S: Final = 0.5
"""Between runs, so that a stopped worker's exit does not overlap the next start."""


@dataclass
class Options:
    runs: int = 5
    modes: tuple[str, ...] = ("start", "dev")
    timeout: float = 300.0
    json: bool = False


async def run(opts: Options) -> dict[tuple[str, str], list[float]]:
    """Seconds to registration, by (mode, side), in run order."""
    install_stop(asyncio.current_task())  # type: ignore[arg-type]
    results: dict[tuple[str, str], list[float]] = {(m, s): [] for m in opts.modes for s in SIDES}
    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-start-"))
    server = ServerProcess(log_level="INFO")
    server.start()
    log = ServerLog(server)
    try:
        async with asyncio.timeout(opts.timeout):
            for i in range(opts.runs):
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                for mode in opts.modes:
                    for side in order:
                        worker = AgentProcess(side, mode, server, f"ws-{side}-{mode}-{i}", workdir)
                        try:
                            took = await wait_registered(log, worker, REGISTER_TIMEOUT_S)
                        finally:
                            await asyncio.to_thread(worker.stop)
                        results[(mode, side)].append(took)
                        print(f"run {i + 1}/{opts.runs} {side:6} {mode:5} {took * 1000:7.0f} ms")
                        await asyncio.sleep(PAUSE_S)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)
        server.log_path.unlink(missing_ok=True)
    return results


def rows(results: dict[tuple[str, str], list[float]], modes: Sequence[str]) -> list[Row]:
    return [
        Row(
            f"worker start → registered, `{mode}` (median)",
            median(results[(mode, "ours")]) * 1000,
            median(results[(mode, "theirs")]) * 1000,
            "ms",
            target=TARGET_RATIO,
        )
        for mode in modes
    ]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.worker_start", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runs", type=int, default=5, help="starts per side and mode (default 5)")
    p.add_argument(
        "--modes",
        default="start,dev",
        help="comma-separated worker modes to measure: start, dev (default both)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="overall limit in seconds (default 300)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 runs, start mode only")
    p.add_argument("--json", action="store_true", help="also print every measure as JSON")
    a = p.parse_args(argv)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes must list some of {', '.join(MODES)}")
    opts = Options(runs=a.runs, modes=modes, timeout=a.timeout, json=a.json)
    if a.quick:
        opts.runs, opts.modes = 2, ("start",)
    if opts.runs < 1 or opts.timeout <= 0:
        p.error("--runs must be at least 1 and --timeout > 0")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    results = run_bench("worker_start", run(opts), opts.timeout)
    if results is None:
        return 1
    print(f"\n{started}, {machine_summary()}, {opts.runs} runs per side and mode\n")
    print(table(rows(results, opts.modes)))
    if opts.json:
        print(json.dumps({f"{m}/{s}": v for (m, s), v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
