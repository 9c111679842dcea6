"""A closed-loop phone conversation with the voice agent (examples/receptionist.py under a
callboard worker), on callboard server and on the real livekit-server: the caller speaks two
sentences, the agent's speech-to-text hears them, the caller hears the scripted LLM's answers
(transcribed back offline), hangs up, and the job ends JS_SUCCESS after livekit-agents closed
its session for the participant's disconnect.

Each run is a subprocess in a private network namespace (tests/interop/conversation_call.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pytest

from callboard.voice_caller import word_error_rate
from tests.interop.call_process import run_call_script
from tests.interop.conversation_call import CALLER_SAYS
from tests.interop.livekit_server import ServerUnavailable, livekit_server_binary
from tests.interop.netns import unavailable_reason

pytestmark = [pytest.mark.interop, pytest.mark.timeout(330, func_only=True)]

CALL_PROCESS_TIMEOUT_S: Final = 300.0
MAX_WER: Final = 0.2
SCRIPTED_ANSWERS: Final = (
    "Great, you're booked in for Monday. Is there anything else?",
    "We're open nine to five, weekdays.",
)
"""What examples/receptionist.py's script answers to CALLER_SAYS."""


def run_call(workdir: Path, kind: str) -> dict[str, Any]:
    run = run_call_script(
        "tests.interop.conversation_call",
        [kind],
        workdir,
        CALL_PROCESS_TIMEOUT_S,
        logs=("call.log", "worker.log"),
    )
    return run.succeeded()


@pytest.fixture(scope="module")
def prerequisites() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("livekit.agents", reason="needs the agents extra: pip install '.[voice]'")
    pytest.importorskip("faster_whisper", reason="needs the voice extra: pip install '.[voice]'")


@pytest.mark.usefixtures("prerequisites")
@pytest.mark.parametrize(
    "kind", ["callboard", pytest.param("livekit-server", marks=pytest.mark.realserver)]
)
def test_a_caller_and_the_agent_understand_each_other_and_the_call_ends_cleanly(
    tmp_path: Path, kind: str
) -> None:
    if kind == "livekit-server":
        try:
            livekit_server_binary()
        except ServerUnavailable as e:
            pytest.skip(str(e))
    report = run_call(tmp_path, kind)
    turns = report["turns"]
    assert [t["said"] for t in turns] == list(CALLER_SAYS)
    for turn, answer in zip(turns, SCRIPTED_ANSWERS, strict=True):
        # the agent's STT heard the caller; the caller heard the scripted LLM's answer
        assert word_error_rate(turn["said"], turn["agent_heard"]) <= MAX_WER, turn
        assert turn["agent_said"] == answer, turn
        assert word_error_rate(answer, turn["caller_heard"]) <= MAX_WER, turn
        assert turn["latency_s"] is not None and turn["latency_s"] > 0, turn

    # the caller hung up: livekit-agents closed the session for it, then the job ended and its
    # worker reported JS_SUCCESS; the server recorded the end too
    (closing,) = report["closing"]
    assert closing["reason"] == "CLIENT_INITIATED", closing
    assert report["closing_before_report"], report
    assert report["worker_reported"] == ["JS_SUCCESS", ""], report
    assert report["server_ended"], report
