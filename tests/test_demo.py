"""`callboard demo` — the README's first command — holds a spoken conversation: a caller shaped
like a LiveKit SIP participant talks with examples/receptionist.py through the embedded server;
the terminal shows the transcript with each turn's latency, the job phases and a summary, and the
call's audio is saved. One call: two concurrent Whisper transcriptions on a 2-core CI machine
misheard a sentence now and then (`bench/voice.py` measures concurrent calls). It runs in a
private network namespace (tests/interop/netns.py): WebRTC media needs an interface address and
the namespace keeps every packet inside the machine."""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from callboard.demo import SCRIPT
from tests.interop.netns import SKIP_EXIT, unavailable_reason

pytestmark = pytest.mark.timeout(300)


def test_demo_holds_a_spoken_conversation(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("faster_whisper", reason="needs the voice extra: pip install -e '.[voice]'")
    demo = [sys.executable, "-m", "callboard.cli", "demo", "--calls", "1", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "tests.interop.netns", *demo],
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stderr.strip())
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "demo passed: 1 call(s), each a spoken conversation with the agent" in out
    for call in ("call 1",):
        lines = [line for line in out.splitlines() if f" {call} " in line]
        said = [line.split("“", 1)[1] for line in lines if " caller " in line]
        answered = [line for line in lines if " agent " in line and "[turn " in line]
        # the agent's STT may split a sentence at a pause: at least one line per sentence
        assert len(said) >= len(SCRIPT) and len(answered) == len(SCRIPT), out
        heard = " ".join(said).lower()
        assert "appointment" in heard and "monday" in heard and "goodbye" in heard, out
        assert any("hears the hang-up" in line for line in lines), out
        assert any("ended JS_SUCCESS (reported by the worker)" in line for line in lines), out
    assert re.search(r"turn latency .*: p50 \d+\.\d\d s, p95 \d+\.\d\d s over 3", out), out
    wavs = sorted(tmp_path.glob("call-_+56975231235_*.wav"))
    assert len(wavs) == 1
    for path in wavs:
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getframerate()) == (2, 16000)
            assert w.getnframes() > 10 * 16000  # greeting and three turns: well over 10 s
    assert (
        "closing agent session due to participant disconnect" in (tmp_path / "demo.log").read_text()
    )
