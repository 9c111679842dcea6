"""A closed-loop phone conversation with the voice agent (examples/receptionist.py under a
callboard worker), on callboard server and on the real livekit-server: the caller speaks two
sentences, the agent's speech-to-text hears them, the caller hears the scripted LLM's answers
(transcribed back offline), hangs up, and the job ends JS_SUCCESS after livekit-agents closed
its session for the participant's disconnect.

Each run is a subprocess in a private network namespace (tests/interop/conversation_call.py);
the runs against both servers go on side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pytest

from callboard.voice_caller import word_error_rate
from tests.interop.call_process import StartedCall, finished, side_by_side, start_call_script
from tests.interop.conversation_call import CALLER_SAYS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(330, func_only=True)]

CALL_PROCESS_TIMEOUT_S: Final = 300.0
MAX_WER: Final = 0.2
SCRIPTED_ANSWERS: Final = (
    "Great, you're booked in for Monday. Is there anything else?",
    "We're open nine to five, weekdays.",
)
"""What examples/receptionist.py's script answers to CALLER_SAYS."""


@pytest.fixture(scope="module")
def calls(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, StartedCall | str]]:
    """The call against each selected server kind, started side by side: each spends most
    of its time on real-time audio."""
    pytest.importorskip("livekit.agents", reason="needs the agents extra: pip install '.[voice]'")
    pytest.importorskip("faster_whisper", reason="needs the voice extra: pip install '.[voice]'")

    def start(kind: str) -> StartedCall:
        return start_call_script(
            "tests.interop.conversation_call",
            [kind],
            tmp_path_factory.mktemp(f"conversation-{kind}"),
            CALL_PROCESS_TIMEOUT_S,
            logs=("call.log", "worker.log"),
        )

    yield from side_by_side(request, "kind", start)


@pytest.mark.parametrize(
    "kind", ["callboard", pytest.param("livekit-server", marks=pytest.mark.realserver)]
)
def test_a_caller_and_the_agent_understand_each_other_and_the_call_ends_cleanly(
    calls: dict[str, StartedCall | str], kind: str
) -> None:
    report = finished(calls, kind).succeeded()
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
