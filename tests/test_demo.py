"""`callboard demo` — the README's first command — runs the whole flow and says it passed."""

from __future__ import annotations

import subprocess
import sys


def test_demo_answers_every_call_with_a_job_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "callboard.cli", "demo", "--calls", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo passed: 2 call(s)" in done.stdout
    assert done.stdout.count("JS_SUCCESS") == 2
    assert '"message": "answering call"' in done.stderr  # logged by the job process, relayed
