"""bench.caller_process holds a call for bench/voice.py in a process of its own: over its pipe
it reports the caller's steps as they happen (dialled, the agent joined), listens when told,
hangs up when told, and ends with the call's steps, including when the agent's audio reached
the caller."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from bench.caller_process import HUNG_UP
from tests.interop.call_process import run_call_script
from tests.interop.livekit_server import ServerUnavailable, livekit_server_binary

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90, func_only=True)]

CALL_PROCESS_TIMEOUT_S: Final = 60.0


def test_a_caller_process_reports_its_call_step_by_step(tmp_path: Path) -> None:
    try:
        livekit_server_binary()
    except ServerUnavailable as e:
        pytest.skip(str(e))
    run = run_call_script("tests.bench.caller_calls", [], tmp_path, CALL_PROCESS_TIMEOUT_S)
    report = run.succeeded()
    steps, result = report["steps"], report["result"]
    assert result["error"] == HUNG_UP and result["latencies"] == [], run.context()
    order = ["dial", "dialled", "agent joined", "first audio", "first voiced"]
    assert all(s in steps for s in order), run.context()
    assert [steps[s] for s in order] == sorted(steps[s] for s in order), run.context()
    assert report["caller_exit"] == 0, run.context()
