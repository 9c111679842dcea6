"""Models load once per worker: livekit-agents' own inference process hosts our runners, jobs
reach it through their job context, and a job whose inference process died falls back to
espeak-ng for speech."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import AsyncIterator

import psutil
import pytest
from livekit.agents import stt
from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.ipc.inference_proc_executor import InferenceProcExecutor
from livekit.agents.testing import fake_job_context

from callboard.plugins.local import HibariTTS, WhisperSTT, offline_tts
from callboard.plugins.local.runners import STT_METHOD, TTS_METHOD, SharedInferenceUnavailable
from tests.plugins.support import ESPEAK_MAX_WER, MAX_WER, SENTENCES, needs_espeak, speak, wer

MODELS_RSS_MB = 150
"""Whisper tiny.en + hibari weigh ~280 MB once loaded; well above an empty process."""


@pytest.fixture
async def inference_process() -> AsyncIterator[InferenceProcExecutor]:
    """The inference process livekit-agents' worker starts when runners are registered."""
    executor = InferenceProcExecutor(
        runners=_InferenceRunner.registered_runners,
        initialize_timeout=120,
        close_timeout=5,
        memory_warn_mb=2000,
        memory_limit_mb=0,
        ping_interval=5,
        ping_timeout=60,
        high_ping_threshold=2.5,
        mp_ctx=mp.get_context("spawn"),
        loop=asyncio.get_running_loop(),
        http_proxy=None,
    )
    await executor.start()
    try:
        await executor.initialize()
        yield executor
    finally:
        await executor.aclose()


def test_importing_the_plugins_registers_both_models() -> None:
    assert {STT_METHOD, TTS_METHOD} <= set(_InferenceRunner.registered_runners)


async def test_jobs_use_the_workers_inference_process(
    inference_process: InferenceProcExecutor,
) -> None:
    assert inference_process.pid is not None
    rss_mb = psutil.Process(inference_process.pid).memory_info().rss / 2**20
    assert rss_mb > MODELS_RSS_MB
    print(f"inference process with both models: {rss_mb:.0f} MB RSS")

    with fake_job_context(inference_executor=inference_process):
        audio = await speak(HibariTTS(), SENTENCES[0])
        event = await WhisperSTT().recognize(audio)
    assert event.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    assert wer(SENTENCES[0], event.alternatives[0].text) <= MAX_WER

    await inference_process.aclose()
    with (
        fake_job_context(inference_executor=inference_process),
        pytest.raises(SharedInferenceUnavailable, match="failed in the shared inference process"),
    ):
        await WhisperSTT().recognize(audio)


@needs_espeak
async def test_speech_falls_back_to_espeak_when_the_inference_process_is_gone(
    inference_process: InferenceProcExecutor,
) -> None:
    await inference_process.aclose()
    chain = offline_tts()
    changes: list[tuple[str, bool]] = []
    chain.on(
        "tts_availability_changed",
        lambda ev: changes.append((type(ev.tts).__name__, ev.available)),
    )

    with fake_job_context(inference_executor=inference_process):
        audio = await speak(chain, SENTENCES[3])
    heard = (await WhisperSTT().recognize(audio)).alternatives[0].text

    assert changes == [("HibariTTS", False)]
    assert audio.sample_rate == chain.sample_rate == 24000  # espeak's 22.05 kHz, resampled
    assert wer(SENTENCES[3], heard) <= ESPEAK_MAX_WER, heard
