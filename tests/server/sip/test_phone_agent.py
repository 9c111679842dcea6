"""The seed's phone call, end to end: a phone calls the embedded SIP gateway, the receptionist
example (livekit-agents AgentSession with the offline voice plugins, under callboard's worker)
is dispatched by the rule's room, answers, and the two talk in G.711 µ-law. One subprocess in a
private network namespace runs it (tests/server/sip/phone_agent_call.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.interop.livekit_server import clean_env
from tests.interop.media_call import REPORT_FILE, SKIP_EXIT
from tests.interop.netns import unavailable_reason
from tests.interop.test_media import kill_family

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400, func_only=True)]

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
CALL_TIMEOUT_S: Final = 300.0


def test_a_phone_call_to_the_receptionist(tmp_path: Path) -> None:
    """200 OK only once the agent subscribed; the agent's STT hears the caller's µ-law speech;
    the phone hears the greeting and the answer (transcribed back); a DTMF digit reaches the
    agent as `sip_dtmf_received`; the caller's BYE closes the agent's session ("closing agent
    session due to participant disconnect") and the job ends JS_SUCCESS."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("hibari", reason="the voice extra: pip install -e '.[voice]'")
    with open(tmp_path / "call.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.server.sip.phone_agent_call", str(tmp_path)],
            cwd=REPO_ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        proc.wait(timeout=CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_family(proc)
    path = tmp_path / REPORT_FILE
    report = json.loads(path.read_text()) if path.exists() else {"error": "no report written"}
    if proc.returncode == SKIP_EXIT:
        pytest.skip(f"no private network namespace for media: {report.get('skip')}")
    context = json.dumps(report, indent=1, default=str)[-5000:]
    for name in ("call.log", "worker.log"):
        with contextlib.suppress(OSError):
            context += f"\n--- {name} ---\n{(tmp_path / name).read_text()[-3000:]}"
    assert proc.returncode == 0 and report["error"] is None, context
    assert report["status"] == 200
    # Whisper tiny.en on 8 kHz µ-law: the words that carry the meaning, not every one
    greeting = report["greeting"].lower()
    assert "dental" in greeting and "help you today" in greeting, report["greeting"]
    heard = [e["text"] for e in report["agent"] if e["event"] == "user_transcript"]
    assert any("appointment" in t.lower() and "monday" in t.lower() for t in heard), heard
    answer = report["answer"].lower()
    assert "monday" in answer and "anything else" in answer, report["answer"]
    assert [(d["digit"], d["identity"]) for d in report["dtmf"]] == [("5", "sip_+56975231235")]
    assert report["room"].startswith("call-_+56975231235_")
    assert report["server_ended"]["status"] == "JS_SUCCESS"
    assert report["closing_logged"] is True
