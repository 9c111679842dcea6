"""Run the reliability tests and write docs/RELIABILITY.md from what they proved.

    python scripts/reliability_report.py          # long: 1,000-job soak, 100,000 fuzz inputs
    python scripts/reliability_report.py --short  # the forms CI runs (100 jobs, 8,000 inputs)

It runs, in one pytest: the soak (tests/soak), the frame fuzzer against a server process
(tests/server/test_fuzz.py), the token-attack table (tests/server/test_auth.py) and the drain
under load (tests/worker/test_drain_under_load.py), with CALLBOARD_RELIABILITY_OUT pointing at
a scratch directory where each test appends its figures (tests/reliability.py). The report is
written from those figures and pytest's own verdict, even when a test fails (then it says so
and this script exits 1). Everything runs on 127.0.0.1; the tests stop what they start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
REPORT: Final = ROOT / "docs" / "RELIABILITY.md"
LONG_JOBS: Final = 1000
LONG_INPUTS: Final = 100_000
SHORT_JOBS: Final = 100
SHORT_INPUTS: Final = 8_000
RUN_TIMEOUT_S: Final = 1800
TESTS: Final = (
    "tests/soak",
    "tests/server/test_fuzz.py::test_frame_generator_against_a_server_process",
    "tests/server/test_auth.py",
    "tests/worker/test_drain_under_load.py",
)
FAULT_NAMES: Final = {
    "raise": "entrypoint raised an exception",
    "sigkill": "job process SIGKILLed (pid from the worker's GET /worker)",
    "hang": "job blocked its event loop (killed as unresponsive)",
    "hog": "job ate memory (killed at job_memory_limit_mb)",
    "connection_cut": "worker A's connection cut (TCP relay aborted)",
    "worker_sigkill": "worker B SIGKILLed, a new worker B started",
    "server_restart": "server stopped (SIGTERM) and restarted on the same port",
    "server_crash": "server SIGKILLed and restarted on the same port",
}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    sha = out.stdout.strip() or "unknown"
    return sha + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def run_tests(short: bool, out: Path) -> tuple[int, float]:
    env = {**os.environ, "CALLBOARD_RELIABILITY_OUT": str(out)}
    env.pop("CALLBOARD_SOAK_JOBS", None)
    env.pop("CALLBOARD_FUZZ_INPUTS", None)
    if not short:
        env["CALLBOARD_SOAK_JOBS"] = str(LONG_JOBS)
        env["CALLBOARD_FUZZ_INPUTS"] = str(LONG_INPUTS)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"]
    argv += [f"--junitxml={out / 'junit.xml'}", *TESTS]
    started = time.monotonic()
    code = subprocess.run(argv, cwd=ROOT, env=env, timeout=RUN_TIMEOUT_S).returncode
    return code, time.monotonic() - started


def results(out: Path) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    path = out / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_kind[str(rec.pop("kind"))].append(rec)
    return by_kind


def test_outcomes(out: Path) -> list[tuple[str, str, float]]:
    """(test id, outcome, seconds) from pytest's JUnit XML."""
    path = out / "junit.xml"
    if not path.exists():
        return []
    rows = []
    for case in ET.parse(path).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "FAILED"
            elif child.tag == "skipped":
                outcome = "skipped"
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        rows.append((name, outcome, float(case.get("time", 0.0))))
    return rows


def grouped(outcomes: list[tuple[str, str, float]]) -> list[tuple[str, int, str, str]]:
    """One row per test function, its parametrized cases folded together."""
    rows: dict[str, tuple[str, int, str, float]] = {}
    for name, outcome, seconds in outcomes:
        key = name.split("[", 1)[0]
        _, cases, verdict, total = rows.get(key, (key, 0, "passed", 0.0))
        rows[key] = (key, cases + 1, outcome if outcome != "passed" else verdict, total + seconds)
    return [(k, c, o, f"{t:.1f}") for k, c, o, t in rows.values()]


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(
    short: bool,
    code: int,
    wall_s: float,
    by_kind: dict[str, list[dict[str, Any]]],
    out: Path,
    commit: str,
) -> str:
    soak = (by_kind.get("soak") or [{}])[-1]
    fuzz = (by_kind.get("fuzz") or [{}])[-1]
    drain = (by_kind.get("drain_under_load") or [{}])[-1]
    attacks = by_kind.get("token_attack", [])
    outcomes = test_outcomes(out)
    failed = [t for t, o, _ in outcomes if o == "FAILED"]
    command = "python scripts/reliability_report.py" + (" --short" if short else "")
    soak_attacks = int(soak.get("attacks_refused", 0))
    lines = [
        "# Reliability",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} at commit "
        f"{commit}, on {machine()}. The run took {wall_s / 60:.1f} minutes; the same "
        "command reproduces it (the soak's job plan and the fuzzer are seeded).",
        "",
        f"**Verdict: {'all reliability tests passed' if code == 0 else 'FAILED'}** "
        f"({len(outcomes) - len(failed)} of {len(outcomes)} tests passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ").",
        "",
        *table(
            ["figure", "value"],
            [
                ["jobs dispatched (soak)", n(soak.get("dispatched", 0))],
                ["jobs lost (soak)", n(soak.get("lost", "—"))],
                ["faults injected (soak)", n(sum(soak.get("faults", {}).values()))],
                ["processes leaked", n(soak.get("processes_leaked", "—"))],
                ["descriptors leaked", n(soak.get("descriptors_leaked", "—"))],
                ["crashes", n(soak.get("crashes", "—"))],
                ["inputs fuzzed", n(fuzz.get("inputs", 0))],
                [
                    "fuzzing problems (5xx, ERROR lines, hangs, bystander misses)",
                    n(fuzz.get("problems", "—")),
                ],
                [
                    "token attacks refused",
                    f"{len(attacks) + soak_attacks} "
                    f"({len(attacks)} in process, {soak_attacks} at the server process)",
                ],
                [
                    "jobs through a drain under load",
                    f"{n(drain.get('jobs', 0))}, lost {n(drain.get('lost', '—'))}",
                ],
            ],
        ),
        "",
    ]
    lines += soak_section(soak)
    lines += fuzz_section(fuzz)
    lines += attack_section(attacks, soak_attacks)
    lines += drain_section(drain)
    lines += [
        "## Tests run",
        "",
        *table(["test", "cases", "outcome", "seconds"], grouped(outcomes)),
        "",
    ]
    return "\n".join(lines)


def soak_section(soak: dict[str, Any]) -> list[str]:
    if not soak:
        return ["## Soak", "", "No soak figures were recorded (see the test outcomes).", ""]
    faults = soak.get("faults", {})
    lines = [
        "## Soak with injected faults (`tests/soak`)",
        "",
        f"`callboard server` and two real workers (`python tests/soak/soak_agent.py start`, "
        f"PROCESS executor, 2 prewarmed processes each, unresponsive_timeout 1.5 s, "
        f"job_memory_limit_mb 160), all subprocesses on 127.0.0.1; "
        f"{n(soak.get('jobs_planned', 0))} jobs dispatched at 3 a second, each with the "
        "fault its dispatch metadata names. "
        f"Wall time {soak.get('wall_s', 0)} s.",
        "",
        "### Faults injected",
        "",
        *table(
            ["fault", "count"],
            [[FAULT_NAMES.get(k, k), n(v)] for k, v in sorted(faults.items())],
        ),
        "",
        "### Every job accounted for",
        "",
        "A dispatch is *created* when the server answered CreateRoom (with the soak agent in "
        "the room's config) with 200. It is *accounted for* when the server epoch (one server "
        "process) that created it listed exactly one dispatch with exactly one job for its room, "
        "and its terminal status is known exactly once: either that epoch's record of the job "
        "reached JS_SUCCESS or JS_FAILED while the epoch lived, or the epoch ended (the server "
        "was restarted, losing its in-memory records) while the job was not terminal and exactly "
        "one worker log has a `job ended` line for the job id with a terminal status; no worker "
        "log has two such lines for it, the agent's ledger shows at most one start, and the "
        "server and a worker never disagree on the status. Anything else is *lost*. Each final "
        "status must also be the one the job's fault calls for (or, for a job on the SIGKILLed "
        "worker, the server's 'disconnected and no MigrateJobRequest' failure).",
        "",
        *table(
            ["", "jobs"],
            [
                ["dispatched", n(soak.get("dispatched", 0))],
                [
                    "terminal status recorded by the server epoch that created them",
                    n(soak.get("accounted_by_server", 0)),
                ],
                [
                    "ended after their server epoch, final status in a worker log",
                    n(soak.get("accounted_by_worker_log", 0)),
                ],
                [
                    "failed with their SIGKILLed worker",
                    n(soak.get("failed_with_their_killed_worker", 0)),
                ],
                [
                    "re-attached to worker A after a cut (MigrateJobRequest), then ended",
                    n(soak.get("migrated_after_a_cut", 0)),
                ],
                ["lost", n(soak.get("lost", 0))],
                ["with two statuses or two starts", n(soak.get("duplicates", 0))],
                ["server and worker disagree", n(soak.get("disagreements", 0))],
                ["status not the one the fault calls for", n(soak.get("unexpected_outcomes", 0))],
            ],
        ),
        "",
        "How the jobs ended, by injected fault:",
        "",
        *table(["fault → final status", "jobs"], sorted(soak.get("outcomes", {}).items())),
        "",
        "### Leaks, memory, crashes",
        "",
        "Descriptors are counted in each worker's main process (/proc/<pid>/fd) when it runs no "
        "job and its warm pool is full, after the warm-up (or its start) and again at the end; "
        "memory is the worker main process's RSS and USS sampled every 0.5 s, growth being the "
        "median of the last tenth of the second half over that of its first tenth. Processes: "
        "every process seen in a worker's tree must be gone once the workers have exited.",
        "",
        *table(
            [
                "worker",
                "exit",
                "fds start → end",
                "RSS growth, 2nd half",
                "USS growth",
                "RSS at end (MB)",
            ],
            [
                [
                    w["label"],
                    "SIGKILLed by the soak" if w["killed"] else w["exit_code"],
                    "—" if w["killed"] else f"{w['fds_baseline']} → {w['fds_final']}",
                    "—" if w["killed"] else f"{w['rss_growth'] * 100:+.1f} %",
                    "—" if w["killed"] else f"{w['uss_growth'] * 100:+.1f} %",
                    "—" if w["killed"] else w["rss_mb_end"],
                ]
                for w in soak.get("workers", [])
            ],
        ),
        "",
        f"Processes leaked: {n(soak.get('processes_leaked', 0))}. Descriptors leaked: "
        f"{n(soak.get('descriptors_leaked', 0))}. Crashes (a process exiting by itself or "
        f"non-zero on SIGTERM): {n(soak.get('crashes', 0))}. Unexpected log lines (ERROR other "
        "than the injected faults' own reports, or anything not JSON, in any server or worker "
        f"log): {n(soak.get('unexpected_log_lines', 0))}. Server RSS at the end of each epoch "
        f"(MB): {', '.join(str(x) for x in soak.get('server_rss_mb', []))}.",
        "",
        "No log of the run (every server's, every worker's with its job processes' lines, the "
        "harness's own records) holds either API secret, any token the run issued or any room "
        "token a job received, or anything shaped like a JWT; each job logs its own room token on "
        "purpose and every such line reads `[redacted]`.",
        "",
    ]
    return lines


def fuzz_section(fuzz: dict[str, Any]) -> list[str]:
    if not fuzz:
        return ["## Fuzzing", "", "No fuzzing figures were recorded.", ""]
    return [
        "## Fuzzing (`tests/server/fuzz_frames.py`)",
        "",
        "A seeded random generator against a `callboard server` process: /agent sessions "
        "(random bytes; valid WorkerMessages truncated, bit-flipped, spliced or doubled; nested "
        "protobuf; text frames; frames over 1 MiB; valid messages in the wrong order, with "
        "duplicated and unknown job ids, unicode and very long names; workers answering real "
        "offers twice or wrongly; bad tokens), Twirp requests (malformed, truncated, huge or "
        "valid JSON and protobuf bodies with unicode and over-long room names and metadata, "
        "good, wrong-room, garbage or no tokens) and raw malformed HTTP. A SimWorker beside them "
        f"must get and finish a job every 2,000 inputs. Wall time {fuzz.get('wall_s', 0)} s.",
        "",
        *table(
            ["figure", "value"],
            [
                ["inputs", n(fuzz.get("inputs", 0))],
                ["/agent frames", n(fuzz.get("agent_frames", 0))],
                ["/agent handshakes", n(fuzz.get("agent_handshakes", 0))],
                ["Twirp requests", n(fuzz.get("twirp_requests", 0))],
                ["raw HTTP requests", n(fuzz.get("raw_http_requests", 0))],
                ["/agent closes by code", fuzz.get("closes", {})],
                ["Twirp answers by status", fuzz.get("twirp_statuses", {})],
                ["bystander jobs finished", n(fuzz.get("bystander_jobs", 0))],
                [
                    "server RSS after warm-up → end (peak), MB",
                    f"{fuzz.get('server_rss_warm_mb')} → {fuzz.get('server_rss_end_mb')} "
                    f"({fuzz.get('server_rss_peak_mb')})",
                ],
                ["server exit code on SIGTERM", fuzz.get("server_exit")],
                [
                    "problems (5xx, ERROR lines, tracebacks, hangs, bystander misses)",
                    n(fuzz.get("problems", 0)),
                ],
            ],
        ),
        "",
        "The hypothesis properties of tests/server/test_fuzz.py (random bytes and out-of-order "
        "messages on /agent, random Twirp requests, against the in-process server) run too.",
        "",
    ]


def attack_section(attacks: list[dict[str, Any]], at_process: int) -> list[str]:
    by_case: Counter[str] = Counter(a["case"] for a in attacks if a.get("refused"))
    return [
        "## Token attacks (`tests/server/token_attacks.py`)",
        "",
        "One table, run against the in-process server (tests/server/test_auth.py) and against "
        "the soak's server process. Every attack is presented on /agent (Authorization header "
        "and access_token query) and on Twirp ListDispatch (JSON and protobuf) with a long "
        "non-dev secret; each must get 401 (Twirp: `unauthenticated`) with a reason that "
        "repeats neither the token nor a secret.",
        "",
        *table(["attack", "endpoints refusing it (in process)"], sorted(by_case.items())),
        "",
        f"At the soak's server process: {at_process} refusals.",
        "",
    ]


def drain_section(drain: dict[str, Any]) -> list[str]:
    if not drain:
        return ["## Drain under load", "", "No figures were recorded.", ""]
    return [
        "## Drain under load (`tests/worker/test_drain_under_load.py`)",
        "",
        "Three real workers (agent scripts, PROCESS executor); 200 jobs of 8 s dispatched at "
        "30 a second; after the first 100, one worker gets SIGTERM.",
        "",
        *table(
            ["figure", "value"],
            [
                ["jobs", drain.get("jobs")],
                ["most running at once", drain.get("peak_concurrent")],
                ["lost or failed", drain.get("lost")],
                ["cut short", drain.get("cut_short")],
                ["jobs per worker", drain.get("per_worker")],
                ["jobs on the drained worker (all finished)", drain.get("on_drained_worker")],
                ["drained worker's exit code", drain.get("drained_exit")],
                ["SIGTERM to exit, s", drain.get("drain_s")],
                ["processes leaked", drain.get("processes_leaked")],
            ],
        ),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--short", action="store_true", help="the CI forms (100 jobs, 8,000 fuzz inputs)"
    )
    parser.add_argument("--output", type=Path, default=REPORT, help="where to write the report")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="callboard-reliability-") as tmp:
        out = Path(tmp)
        commit = git_commit()
        code, wall_s = run_tests(args.short, out)
        text = render(args.short, code, wall_s, results(out), out, commit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.output} (pytest exit {code}, {wall_s / 60:.1f} min)")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
