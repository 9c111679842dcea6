"""callboard installs and runs without livekit-agents: the core never imports it. Checked in
fresh interpreters where any import of livekit.agents (or a plugin) fails, as on a machine
installed with `pip install -e .` and no `agents` extra; job processes inherit the block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.interop.netns import SKIP_EXIT, unavailable_reason

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
BLOCKER: Final = '''
import importlib.abc, sys

class NoLivekitAgents(importlib.abc.MetaPathFinder):
    """As if livekit-agents were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name in ("livekit.agents", "livekit.plugins") or name.startswith(
            ("livekit.agents.", "livekit.plugins.")
        ):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoLivekitAgents())
'''
CORE_MODULES: Final = (
    "callboard",
    "callboard.cli",
    "callboard.demo",
    "callboard.demo_tones",
    "callboard.job.child",
    "callboard.job.flavour",
    "callboard.job.inference",
    "callboard.job.pool",
    "callboard.job.thread",
    "callboard.job.zygote",
    "callboard.server.app",
    "callboard.worker.worker",
)


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a sitecustomize that blocks livekit.agents in every interpreter."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_the_block_works(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import livekit.agents"],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "blocked by the test" in done.stderr


def test_the_core_imports_nothing_from_livekit_agents(tmp_path: Path) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "from callboard import JobContext, JobProcess, JobRequest, Worker, WorkerOptions, cli\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('livekit.agents'))\n"
        "assert not leaked, leaked\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_callboard_demo_trades_tones_both_ways_without_livekit_agents(tmp_path: Path) -> None:
    """Without the voice extra the demo still places its calls: the caller sip_+56975231235 and
    callboard's own agent (no livekit-agents in any process) hear each other's tones, each side
    counting, and one line names the extra that brings the spoken conversation. It runs in a
    private network namespace (tests/interop/netns.py): WebRTC needs an interface address."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    demo = [sys.executable, "-m", "callboard.cli", "demo", "--calls", "2", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "tests.interop.netns", *demo],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stderr.strip())
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert (
        "blocked by the test" in out
        and "a spoken conversation needs pip install -e '.[voice]'" in out
    )
    assert "demo passed: 2 call(s) answered by job processes, tones both ways" in out
    for call in ("call 1", "call 2"):
        lines = [line for line in out.splitlines() if f" {call} " in line]
        assert any("sip_+56975231235 dials in" in line for line in lines), out
        assert any(re.search(r"agent +heard the caller: \d+ ms", line) for line in lines), out
        assert any(re.search(r"caller +heard the agent: \d+ ms", line) for line in lines), out
        assert any("ended JS_SUCCESS (reported by the worker)" in line for line in lines), out
    assert "Traceback" not in done.stderr
