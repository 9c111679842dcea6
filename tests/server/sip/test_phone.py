"""`callboard call`: a phone in the terminal, calling the embedded gateway."""

from __future__ import annotations

import asyncio
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from callboard.server.app import EmbeddedServer
from callboard.server.sip.audio import read_wav, resample, write_wav
from callboard.server.sip.phone import CallOptions, CallOptionsError, SipPhone, utterance
from callboard.server.sip.uac import DialTarget
from tests.server.sip import sipp
from tests.server.sip.room_agent import RoomAgent
from tests.server.sip.test_calls import one_call, provision
from tests.server.support import wait_until


async def test_the_phone_calls_the_gateway_and_talks(
    gateway: EmbeddedServer, agent: RoomAgent
) -> None:
    """Both ways through the room: the phone's tone reaches the agent, the agent's 440 Hz tone
    and a DTMF digit reach the phone; digits from the phone reach the agent."""
    await provision(gateway, auth=("acme", "s3cret"))
    assert gateway.sip is not None
    target = DialTarget(
        "127.0.0.1", gateway.sip.port, sipp.CALLED, sipp.CALLER, username="acme", password="s3cret"
    )
    said: list[str] = []
    async with SipPhone() as phone:
        call = asyncio.create_task(
            phone.call(target, sipp.tone(1.0, hz=300), listen=3.0, dtmf="7", say=said.append)
        )
        seen = await one_call(agent)
        await wait_until(lambda: "active" in seen.statuses, "the answer")
        agent.send_digit(seen.identity, "5")
        await agent.say_tone(seen.identity, 1.0, hz=440)
        result = await call
    assert (result.status, result.codec) == (200, "PCMU")
    assert dominant_hz(result.audio, 8000) == pytest.approx(440, abs=10)
    assert result.sound_seconds >= 0.8, "the agent's second of tone reached the phone"
    assert "received DTMF 5" in said
    await wait_until(lambda: seen.left, "the caller's leave")
    assert dominant_hz(seen.audio, 48000) == pytest.approx(300, abs=10)
    assert len(seen.audio) / 48000 >= 0.9 and seen.digits == ["7"]
    assert seen.statuses == ["ringing", "active", "hangup"]


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    loud = pcm[np.abs(pcm.astype(np.int32)) > 0] if len(pcm) else pcm
    spectrum = np.abs(np.fft.rfft(loud.astype(np.float64)))
    return float(np.fft.rfftfreq(len(loud), 1 / rate)[int(np.argmax(spectrum[1:])) + 1])


async def test_callboard_call_from_the_terminal(
    gateway: EmbeddedServer, agent: RoomAgent, tmp_path: Path
) -> None:
    await provision(gateway)
    assert gateway.sip is not None
    wav = tmp_path / "question.wav"
    write_wav(wav, resample(sipp.tone(1.0), 8000, 16000), 16000)
    saved = tmp_path / "answer.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callboard.cli",
        "call",
        f"127.0.0.1:{gateway.sip.port}",
        "--wav",
        str(wav),
        "--listen",
        "0.5",
        "--save",
        str(saved),
        "--no-wait-greeting",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, text
    assert (
        "answered (PCMU)" in text
        and "sent 1.0 s" in text
        and f"saved what was heard to {saved}" in text
    )
    with wave.open(str(saved)) as heard:
        assert heard.getframerate() == 8000 and heard.getnframes() > 8000


def test_an_utterance_ends_after_a_second_of_quiet() -> None:
    quiet, loud = np.zeros(160, dtype=np.int16), np.full(160, 2000, dtype=np.int16)
    heard = [quiet] * 10 + [loud] * 20 + [quiet] * 30 + [loud] * 5 + [quiet] * 58
    assert utterance(heard, 0) is None, "still within 1.2 s of the last sound"
    heard.append(quiet)
    assert utterance(heard, 0) == (10, 65), "a pause under 1.2 s does not end it"
    assert utterance(heard, 65) is None


def test_call_options_are_checked() -> None:
    with pytest.raises(CallOptionsError, match="--wav FILE or --say"):
        CallOptions()
    with pytest.raises(CallOptionsError, match="host:port"):
        CallOptions(address="nowhere", say="hi")
    with pytest.raises(CallOptionsError, match="--dtmf"):
        CallOptions(say="hi", dtmf="9x")


def test_resampling_keeps_a_tone(tmp_path: Path) -> None:
    tone = sipp.tone(0.5, hz=440)
    path = tmp_path / "t.wav"
    write_wav(path, resample(tone, 8000, 48000), 48000)
    back = read_wav(path, 8000)
    assert abs(len(back) - len(tone)) <= 1
    error = back[100:-100].astype(float) - tone[100 : len(back) - 100].astype(float)
    assert np.sqrt(np.mean(error**2)) < 0.05 * np.sqrt(np.mean(tone.astype(float) ** 2))
