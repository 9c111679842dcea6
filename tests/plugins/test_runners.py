"""Models load once per worker: livekit-agents' own inference process hosts our runners, jobs
reach it through their job context, and a job whose inference process died falls back to
espeak-ng for speech."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psutil
import pytest
from livekit.agents import stt
from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.ipc.inference_proc_executor import InferenceProcExecutor
from livekit.agents.testing import fake_job_context

from callboard.plugins.local import HibariTTS, WhisperSTT, offline_tts
from callboard.plugins.local.runners import (
    STT_METHOD,
    TTS_METHOD,
    SharedInferenceUnavailable,
    decode_request,
    encode_request,
    inference_process,
)
from tests.plugins.support import ESPEAK_MAX_WER, MAX_WER, SENTENCES, needs_espeak, speak, wer

MODELS_RSS_MB = 150
"""Whisper tiny.en + hibari weigh ~280 MB once loaded; well above an empty process."""
MIN_INFERENCE_CPU = 0.3
"""CPU seconds three syntheses and three recognitions take at the least."""


@pytest.fixture
async def shared() -> AsyncIterator[InferenceProcExecutor]:
    """The inference process livekit-agents' worker starts when runners are registered."""
    async with inference_process() as executor:
        yield executor


def test_requests_round_trip_with_newlines_in_text_and_pcm() -> None:
    header = {"text": "Two\nlines.", "speed": 1.0}
    pcm = bytes(range(256)) * 4  # every byte value, b"\n" included
    assert decode_request(encode_request(header, pcm)) == (header, pcm)


def test_importing_the_plugins_registers_both_models() -> None:
    assert {STT_METHOD, TTS_METHOD} <= set(_InferenceRunner.registered_runners)


async def test_jobs_use_the_workers_inference_process(
    shared: InferenceProcExecutor,
) -> None:
    assert shared.pid is not None
    rss_mb = psutil.Process(shared.pid).memory_info().rss / 2**20
    assert rss_mb > MODELS_RSS_MB
    print(f"inference process with both models: {rss_mb:.0f} MB RSS")

    process = psutil.Process(shared.pid)
    cpu_before = sum(process.cpu_times()[:2])
    with fake_job_context(inference_executor=shared):
        # three calls at once, as three jobs of one worker would ask
        audio = await asyncio.gather(*(speak(HibariTTS(), s) for s in SENTENCES[:3]))
        events = await asyncio.gather(*(WhisperSTT().recognize(a) for a in audio))
    assert sum(process.cpu_times()[:2]) - cpu_before > MIN_INFERENCE_CPU  # it did the work
    for sentence, event in zip(SENTENCES, events, strict=False):
        assert event.type == stt.SpeechEventType.FINAL_TRANSCRIPT
        assert wer(sentence, event.alternatives[0].text) <= MAX_WER, event.alternatives

    await shared.aclose()
    with (
        fake_job_context(inference_executor=shared),
        pytest.raises(SharedInferenceUnavailable, match="failed in the shared inference process"),
    ):
        await WhisperSTT().recognize(audio[0])


@needs_espeak
async def test_speech_falls_back_to_espeak_when_the_inference_process_is_gone(
    shared: InferenceProcExecutor,
) -> None:
    await shared.aclose()
    chain = offline_tts()
    changes: list[tuple[str, bool]] = []
    chain.on(
        "tts_availability_changed",
        lambda ev: changes.append((type(ev.tts).__name__, ev.available)),
    )

    with fake_job_context(inference_executor=shared):
        audio = await speak(chain, SENTENCES[3])
    heard = (await WhisperSTT().recognize(audio)).alternatives[0].text

    assert changes == [("HibariTTS", False)]
    assert audio.sample_rate == chain.sample_rate == 24000  # espeak's 22.05 kHz, resampled
    assert wer(SENTENCES[3], heard) <= ESPEAK_MAX_WER, heard
