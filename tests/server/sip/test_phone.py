"""`callboard call`: a phone in the terminal, calling the embedded gateway."""

from __future__ import annotations

import asyncio
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.server.sip.audio import read_wav, resample, write_wav
from callboard.server.sip.phone import CallOptions, CallOptionsError, SipPhone
from callboard.server.sip.uac import DialTarget
from tests.server.sip import sipp
from tests.server.sip.test_calls import legs, provision


@pytest.fixture
async def gateway() -> AsyncIterator[EmbeddedServer]:
    async with run_server(ServerConfig(port=0, sip_port=0)) as srv:
        yield srv


async def test_the_phone_calls_the_gateway_and_talks(gateway: EmbeddedServer) -> None:
    await provision(gateway, auth=("acme", "s3cret"))
    assert gateway.sip is not None
    target = DialTarget(
        "127.0.0.1", gateway.sip.port, sipp.CALLED, sipp.CALLER, username="acme", password="s3cret"
    )
    async with SipPhone() as phone:
        result = await phone.call(target, sipp.tone(1.0), listen=0.3, dtmf="7")
    assert (result.status, result.codec) == (200, "PCMU")
    assert 0.8 < len(result.audio) / 8000 < 2.5, "the gateway's stream was heard"
    [leg] = legs(gateway)
    await asyncio.sleep(0.1)
    assert leg.frames >= 45 and leg.digits == ["7"]
    assert leg.statuses == ["ringing", "active", "hangup"]


async def test_callboard_call_from_the_terminal(gateway: EmbeddedServer, tmp_path: Path) -> None:
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
