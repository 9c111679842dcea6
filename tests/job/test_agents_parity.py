"""Agents port by changing one import: callboard's JobContext, JobProcess and JobRequest have
every public member of livekit-agents 1.8.9's, with compatible signatures (introspected from
the installed livekit-agents, in a subprocess: see tests/job/agents_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest

from tests.job.agents_parity import CLASSES

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# livekit-agents 1.8.9's public members: a floor, so the comparison cannot pass by seeing none
MIN_MEMBERS: Final = {"JobContext": 26, "JobProcess": 5, "JobRequest": 7}


@pytest.fixture(scope="module")
def parity() -> dict[str, dict[str, str]]:
    pytest.importorskip("livekit.agents", reason="needs livekit-agents (pip install '.[test]')")
    done = subprocess.run(
        [sys.executable, "-m", "tests.job.agents_parity"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("cls", CLASSES)
def test_every_public_member_of_livekit_agents_exists_with_a_compatible_signature(
    parity: dict[str, dict[str, str]], cls: str
) -> None:
    members = parity[cls]
    assert len(members) >= MIN_MEMBERS[cls], sorted(members)
    problems = {name: why for name, why in members.items() if why}
    assert problems == {}


def test_the_members_the_issue_named_are_there(parity: dict[str, dict[str, str]]) -> None:
    named = [
        "delete_room",
        "add_sip_participant",
        "transfer_sip_participant",
        "token_claims",
        "add_participant_entrypoint",
        "local_participant_identity",
        "primary_session",
        "agent",
        "is_fake_job",
        "connect",
    ]
    assert {n: parity["JobContext"][n] for n in named} == dict.fromkeys(named, "")
    assert parity["JobRequest"]["reject"] == ""
