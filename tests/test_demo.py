"""`callboard demo` — the README's first command — runs the whole flow and says it passed: calls
answered by job processes, with audio both ways through the embedded server. It runs in a
private network namespace (tests/interop/netns.py): WebRTC media needs an interface address and
the namespace keeps every packet inside the machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.interop.netns import SKIP_EXIT, unavailable_reason


def test_demo_answers_every_call_with_a_job_process_and_audio_both_ways() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, "-m", "tests.interop.netns"]
        + [sys.executable, "-m", "callboard.cli", "demo", "--calls", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "demo passed: 2 call(s) answered by job processes, audio both ways" in done.stdout
    assert done.stdout.count("JS_SUCCESS") == 2
    assert done.stdout.count("agent heard the caller") == 2
    assert '"message": "answering call"' in done.stderr  # logged by the job process, relayed
