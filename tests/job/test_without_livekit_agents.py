"""callboard installs and runs without livekit-agents: the core never imports it. Checked in
fresh interpreters where any import of livekit.agents (or a plugin) fails, as on a machine
installed with `pip install -e .` and no `agents` extra; job processes inherit the block."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from callboard.cli import EXIT_USAGE

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


def test_callboard_demo_says_it_needs_the_voice_extra_without_livekit_agents(
    tmp_path: Path,
) -> None:
    """The demo's agent is examples/receptionist.py (an AgentSession): without livekit-agents
    the demo stops at once with one line naming the extra that brings it."""
    done = subprocess.run(
        [sys.executable, "-m", "callboard.cli", "demo"],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert "callboard: error: the demo's agent needs the voice extra" in done.stderr
    assert "pip install -e '.[voice]'" in done.stderr
    assert "Traceback" not in done.stderr
