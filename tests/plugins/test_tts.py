"""The offline TTS chain: hibari speaks sentence by sentence, espeak-ng stands behind it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from livekit.agents import tokenize, tts

from callboard.plugins.local import (
    EspeakOptions,
    EspeakTTS,
    HibariOptions,
    HibariTTS,
    WhisperSTT,
    offline_tts,
)
from callboard.plugins.local.tts import ESPEAK_SAMPLE_RATE
from tests.plugins.support import ESPEAK_MAX_WER, MAX_WER, SENTENCES, needs_espeak, rms, speak, wer

FIRST_AUDIO_TIMEOUT = 10.0


async def test_hibari_speaks_24_khz_audio_that_whisper_understands() -> None:
    audio = await speak(HibariTTS(), SENTENCES[2])

    assert (audio.sample_rate, audio.num_channels) == (24000, 1)
    assert rms(audio) > 500
    heard = (await WhisperSTT().recognize(audio)).alternatives[0].text
    assert wer(SENTENCES[2], heard) <= MAX_WER, heard


async def test_the_first_sentence_plays_before_the_reply_is_written() -> None:
    adapter = tts.StreamAdapter(
        tts=HibariTTS(), sentence_tokenizer=tokenize.blingfire.SentenceTokenizer()
    )
    async with adapter.stream() as stream:
        started = time.perf_counter()
        for word in ["Thanks", "for", "calling", "Acme", "Dental.", "How", "can"]:
            stream.push_text(word + " ")
        first = await asyncio.wait_for(anext(stream), FIRST_AUDIO_TIMEOUT)
        first_audio = time.perf_counter() - started
        for word in ["I", "help", "you", "today?"]:
            stream.push_text(word + " ")
        stream.end_input()
        rest = [ev async for ev in stream]

    assert first.frame.samples_per_channel > 0
    assert sum(ev.frame.duration for ev in [first, *rest]) > 3.0
    print(f"hibari first audio after {first_audio * 1000:.0f} ms")


@needs_espeak
async def test_espeak_ng_is_understood_and_options_reach_it() -> None:
    sentence = SENTENCES[3]
    audio = await speak(EspeakTTS(), sentence)
    slow = await speak(EspeakTTS(EspeakOptions(words_per_minute=100)), sentence)

    assert audio.sample_rate == ESPEAK_SAMPLE_RATE
    assert slow.duration > 1.3 * audio.duration
    heard = (await WhisperSTT().recognize(audio)).alternatives[0].text
    assert wer(sentence, heard) <= ESPEAK_MAX_WER, heard


@needs_espeak
def test_the_chain_ends_with_espeak_when_it_is_installed() -> None:
    chain = offline_tts()
    assert [type(t) for t in chain._tts_instances] == [HibariTTS, EspeakTTS]
    assert chain.sample_rate == 24000


def test_without_espeak_the_chain_is_hibari_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh machine: no espeak-ng
    assert not EspeakTTS.available()
    assert [type(t) for t in offline_tts()._tts_instances] == [HibariTTS]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="speed"):
        HibariOptions(speed=3.0)
    with pytest.raises(ValueError, match="words_per_minute"):
        EspeakOptions(words_per_minute=10)
