"""The soak with injected faults (see harness.py for the run and accounting.py for what
"accounted for" means): one run serves every test of this module.

CI runs the short form (CALLBOARD_SOAK_JOBS unset: 100 jobs, under a minute);
`CALLBOARD_SOAK_JOBS=1000 pytest tests/soak` (or scripts/reliability_report.py) runs the long
form.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from callboard.log import REDACTED
from tests.reliability import env_int, record
from tests.server.token_attacks import ATTACKS, ENDPOINTS
from tests.soak.accounting import FAULTS
from tests.soak.harness import MEMORY_GROWTH_LIMIT, SoakPlan, SoakReport, run_soak
from tests.subprocs import json_lines

JOBS_ENV: Final = "CALLBOARD_SOAK_JOBS"
CI_JOBS: Final = 100
JOBS: Final = env_int(JOBS_ENV, CI_JOBS)
TIMEOUT_S: Final = 300 + 2 * JOBS
JWT_RE: Final = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ")
"""A JWT's header and the start of its payload (both base64url JSON objects): a random id that
happens to contain "eyJ" (AW_XeyJxN6ckuNS) does not match."""
B64URL_RUN: Final = re.compile(r"[A-Za-z0-9_-]{43,}")
SIGNATURE_LEN: Final = 43
"""An HS256 signature, base64url without padding."""

pytestmark = pytest.mark.timeout(TIMEOUT_S)


class Records(logging.Handler):
    """Every log record of this (the harness's) process during the soak."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + " " + repr(record.__dict__))


@dataclass
class Run:
    report: SoakReport
    plan: SoakPlan
    workdir: Path
    own_logs: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    plan = SoakPlan.sized(JOBS)
    workdir = tmp_path_factory.mktemp("soak")
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        report = asyncio.run(run_soak(plan, workdir))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    record("soak", {"jobs_env": JOBS_ENV, **report.summary()})
    yield Run(report, plan, workdir, handler.lines)


def test_every_dispatched_job_is_accounted_for(run: Run) -> None:
    report, acc = run.report, run.report.accounting
    assert report.dispatch_errors == []
    assert report.dispatched == run.plan.jobs == acc.created
    assert acc.lost == []
    assert acc.duplicates == []
    assert acc.disagreements == []
    assert acc.by_server + acc.by_worker_log == report.dispatched
    assert acc.by_worker_log > 0, "no job ran through a server restart"


def test_every_job_ends_as_its_fault_calls_for(run: Run) -> None:
    acc = run.report.accounting
    assert acc.unexpected == []
    planned = Counter(spec.fault for spec in run.plan.schedule())
    ended: Counter[str] = Counter()
    for outcome, n in acc.outcomes.items():
        ended[outcome.split(" -> ")[0]] += n
    assert ended == planned


def test_every_fault_kind_was_injected(run: Run) -> None:
    faults, acc = run.report.faults, run.report.accounting
    planned = Counter(spec.fault for spec in run.plan.schedule())
    for kind in FAULTS[1:]:
        assert planned[kind] > 0, kind
        # a fault meant for a job on the SIGKILLed worker may not have reached it
        assert planned[kind] - acc.worker_gone <= faults[kind] <= planned[kind], kind
    events = Counter(run.plan.event_at().values())
    assert faults["connection_cut"] == events["cut"]
    assert faults["worker_sigkill"] == events["kill_worker"]
    assert faults["server_restart"] == events["restart_server"]
    assert faults["server_crash"] == events["crash_server"]


def test_no_process_or_descriptor_is_leaked(run: Run) -> None:
    report = run.report
    assert report.leaked_processes == []
    for w in report.workers:
        if not w.killed:
            assert w.fds_baseline > 0
            assert w.fds_final <= w.fds_baseline, f"worker {w.label} leaked descriptors"


def test_worker_memory_is_flat_over_the_second_half(run: Run) -> None:
    for w in run.report.workers:
        if not w.killed:
            assert w.rss_growth <= MEMORY_GROWTH_LIMIT, (w.label, w.rss_growth)
            assert w.uss_growth <= MEMORY_GROWTH_LIMIT, (w.label, w.uss_growth)


def test_nothing_crashed_and_nothing_unexpected_was_logged(run: Run) -> None:
    report = run.report
    assert report.crashes == []
    assert report.unexpected_log_lines == []
    assert [w.exit_code for w in report.workers if not w.killed] == [0, 0]


def test_token_attacks_on_the_server_process_are_refused(run: Run) -> None:
    assert run.report.attack_problems == []
    assert run.report.attacks_refused == len(ATTACKS) * len(ENDPOINTS)


def test_no_log_of_the_run_holds_the_secret_or_a_token(run: Run) -> None:
    """Every log of the run (each server process's, each worker's with its job processes'
    relayed lines, and this process's records) is free of both API secrets, of every token
    the harness issued, of every room token the jobs received, and of anything shaped like a
    JWT. The soak agent logs its room token on purpose: the lines are there, redacted."""
    report = run.report
    assignment_tokens = {
        str(line["token"])
        for line in json_lines(run.workdir / "ledger.jsonl")
        if line.get("event") == "start"
    }
    assert len(assignment_tokens) >= report.dispatched - report.accounting.worker_gone
    tokens = set(report.issued_tokens) | assignment_tokens
    signatures = {t.rsplit(".", 1)[-1] for t in tokens if t.count(".") == 2}
    signatures = {s for s in signatures if len(s) == SIGNATURE_LEN}
    assert len(signatures) >= len(assignment_tokens)
    secrets = [report.secret, report.other_secret]
    texts = [(p.name, p.read_text(errors="replace")) for p in report.log_files]
    texts.append(("harness records", "\n".join(run.own_logs)))
    for name, text in texts:
        for secret in secrets:
            assert secret not in text, f"an API secret is in {name}"
        found = JWT_RE.findall(text)
        assert not found, f"{len(found)} JWT-like strings in {name}"
        # A token's signature alone is as bad as the whole token: look for any of them in
        # every run of base64url characters long enough to hold one.
        for run_ in B64URL_RUN.findall(text):
            windows = {run_[i : i + SIGNATURE_LEN] for i in range(len(run_) - SIGNATURE_LEN + 1)}
            assert not windows & signatures, f"a token's signature is in {name}"
    careless = [
        line
        for path in report.log_files
        for line in json_lines(path)
        if line.get("message") == "soak job started"
    ]
    assert {line["room_token"] for line in careless} == {REDACTED}
    # A job SIGKILLed right after it started may not have had its line relayed yet.
    assert len(careless) >= len(assignment_tokens) - report.faults["sigkill"]
