"""The seed's phone call, end to end: Debian's sipp calls the embedded SIP gateway, the
receptionist example (livekit-agents AgentSession with the offline voice plugins, under
callboard's worker) is dispatched into the rule's room, answers, and the two talk in G.711 µ-law.
One subprocess in a private network namespace runs it (tests/server/sip/phone_agent_call.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Final

import pytest
from livekit import rtc

from callboard.voice_caller import word_error_rate
from tests.interop.call_process import CALL_LOG, run_call_script
from tests.interop.netns import unavailable_reason
from tests.server.sip.phone_agent_call import CALLER_SAYS
from tests.server.sip.sipp import SIPP_MISSING

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400, func_only=True)]

CALL_TIMEOUT_S: Final = 300.0
CALLER_ID: Final = "sip_+56975231235"
MAX_WER: Final = 0.2


def test_sipp_calls_the_receptionist(tmp_path: Path) -> None:
    """The seed's flow with Debian's sipp as the phone: room named by the rule, the caller's
    participant as livekit-sip makes it, the agent dispatched and hearing the caller before the
    200 OK, the caller's µ-law speech transcribed by the agent's STT, the agent's answer heard
    at the phone's media address, an RFC 4733 digit reaching the agent as
    `sip_dtmf_received`, and sipp's BYE closing the agent's session ("closing agent session
    due to participant disconnect") with the job ending JS_SUCCESS."""
    if shutil.which("sipp") is None:
        pytest.skip(SIPP_MISSING)
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("hibari", reason="the voice extra: pip install -e '.[voice]'")
    run = run_call_script(
        "tests.server.sip.phone_agent_call",
        (),
        tmp_path,
        CALL_TIMEOUT_S,
        logs=(CALL_LOG, "worker.log", "server.log", "sipp/errors.log"),
    )
    report = run.succeeded()

    # livekit-sip's room and participant (see the table in test_calls.py)
    assert re.fullmatch(r"call-_\+56975231235_[2-9A-HJ-NP-Za-km-z]{12}", report["room"])
    subscribed, *_ = report["track_subscribed"]
    assert (subscribed["identity"], subscribed["name"]) == (CALLER_ID, "Phone +56975231235")
    assert subscribed["kind"] == rtc.ParticipantKind.PARTICIPANT_KIND_SIP
    attributes = subscribed["attributes"]
    assert re.fullmatch(r"SCL_\w{12}", attributes["sip.callID"])
    assert attributes["sip.trunkID"] == report["trunk_id"]
    assert attributes["sip.ruleID"] == report["rule_id"]
    assert attributes["sip.phoneNumber"] == "+56975231235"
    assert attributes["sip.trunkPhoneNumber"] == "+15550100"
    assert attributes["sip.hostname"] == "127.0.0.1"
    # answered only once the dispatched agent heard the caller: it saw ringing turn active
    assert report["answered"]["heard_by"] == [subscribed["agent"]]
    statuses = [
        e["changed"]["sip.callStatus"]
        for e in report["attributes_changed"]
        if e["identity"] == CALLER_ID and "sip.callStatus" in e["changed"]
    ]
    assert statuses[:1] == ["active"], statuses

    # the conversation, both ways through G.711 µ-law (Whisper tiny.en at 8 kHz: WER <= 0.2)
    greeting, answer, *_ = [e["text"] for e in report["agent_said"]]
    assert word_error_rate(greeting, report["greeting"]) <= MAX_WER, (greeting, report)
    heard = " ".join(e["text"] for e in report["user_transcript"])
    assert word_error_rate(CALLER_SAYS, heard) <= MAX_WER, heard
    assert "nine to five" in answer, answer
    assert word_error_rate(answer, report["answer"]) <= MAX_WER, (answer, report["answer"])
    assert [(d["digit"], d["identity"]) for d in report["dtmf"]] == [("5", CALLER_ID)]

    # sipp's BYE ends the call, the agent's session and the job
    assert report["sipp"]["returncode"] == 0
    assert report["closing_logged"] is True
    assert report["server_ended"]["status"] == "JS_SUCCESS"
