"""Under callboard's worker the same runners live in callboard's inference process (the one the
zygote forks for its jobs): the plugins reach Whisper and hibari there through a job's
inference executor."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import psutil
import pytest
from livekit.agents.testing import fake_job_context

from callboard.job.inference import InferenceClient, socket_name
from callboard.plugins.local import HibariTTS, WhisperSTT
from tests.plugins.support import MAX_WER, SENTENCES, speak, wer

READY_TIMEOUT = 120.0
READY_LINE = b"inference process ready"
INFERENCE_PROCESS = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "import callboard.plugins.local  # registers the runners, as the agent module does\n"
    "from callboard.job.inference import inference_main\n"
    "sys.exit(inference_main(int(sys.argv[1])))\n"
)


@pytest.fixture
async def callboard_inference() -> AsyncIterator[tuple[int, InferenceClient]]:
    """callboard's inference process body, addressed as a zygote with this test's pid would."""
    owner = os.getpid()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INFERENCE_PROCESS, str(owner), stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(READY_TIMEOUT):
            while READY_LINE not in (line := await proc.stderr.readline()):
                assert line, "the inference process exited before it was ready"
        yield proc.pid, InferenceClient(socket_name(owner))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_callboards_inference_process_serves_the_plugins(
    callboard_inference: tuple[int, InferenceClient],
) -> None:
    pid, client = callboard_inference
    process = psutil.Process(pid)
    cpu_before = sum(process.cpu_times()[:2])

    with fake_job_context(inference_executor=client):
        audio = await speak(HibariTTS(), SENTENCES[1])
        heard = (await WhisperSTT().recognize(audio)).alternatives[0].text

    assert wer(SENTENCES[1], heard) <= MAX_WER, heard
    assert sum(process.cpu_times()[:2]) - cpu_before > 0.1  # the models ran there
