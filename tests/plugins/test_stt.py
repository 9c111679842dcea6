"""WhisperSTT hears what the offline TTS says, per utterance and streaming through the VAD."""

from __future__ import annotations

import time

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import stt

from callboard.plugins.local import (
    HibariTTS,
    WhisperOptions,
    WhisperSTT,
    load_vad,
    models,
    streaming_stt,
)
from callboard.plugins.local.stt import to_stt_rate
from tests.plugins.support import (
    MAX_WER,
    PHONE_RATE,
    SENTENCES,
    in_frames,
    resample,
    silence,
    speak,
    through_phone_line,
    wer,
)

ROOM_RATE = 48000


@pytest.mark.parametrize("sentence", SENTENCES)
async def test_recognizes_synthesized_speech_at_the_rooms_rate(sentence: str) -> None:
    audio = resample(await speak(HibariTTS(), sentence), ROOM_RATE)

    started = time.perf_counter()
    event = await WhisperSTT().recognize(in_frames(audio))
    latency = time.perf_counter() - started

    assert event.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    heard = event.alternatives[0].text
    assert wer(sentence, heard) <= MAX_WER, heard
    assert 0.0 < event.alternatives[0].confidence <= 1.0
    print(f"stt {audio.duration:.2f} s of speech in {latency * 1000:.0f} ms: {heard!r}")


@pytest.mark.parametrize("sentence", SENTENCES[:2])
async def test_recognizes_speech_that_crossed_a_g711_phone_line(sentence: str) -> None:
    call_audio = through_phone_line(await speak(HibariTTS(), sentence))
    assert call_audio.sample_rate == PHONE_RATE

    heard = (await WhisperSTT().recognize(resample(call_audio, ROOM_RATE))).alternatives[0].text

    assert wer(sentence, heard) <= MAX_WER, heard


async def test_silence_and_line_noise_are_not_transcribed() -> None:
    hiss = np.random.default_rng(0).normal(0, 300, ROOM_RATE).astype(np.int16)
    noise = rtc.AudioFrame(hiss.tobytes(), ROOM_RATE, 1, len(hiss))
    stt_ = WhisperSTT()
    for audio in (silence(1.5, ROOM_RATE), noise):
        assert (await stt_.recognize(audio)).alternatives[0].text == ""


async def test_streams_one_final_transcript_per_utterance_through_the_vad() -> None:
    first, second = SENTENCES[0], SENTENCES[3]
    tts = HibariTTS()
    parts = [
        silence(0.5, ROOM_RATE),
        resample(await speak(tts, first), ROOM_RATE),
        silence(1.2, ROOM_RATE),
        resample(await speak(tts, second), ROOM_RATE),
        silence(1.2, ROOM_RATE),
    ]
    stream = streaming_stt(load_vad()).stream()
    for part in parts:
        for frame in in_frames(part):
            stream.push_frame(frame)
    stream.end_input()

    events = [ev async for ev in stream]

    kinds = [ev.type for ev in events]
    assert (
        kinds
        == [
            stt.SpeechEventType.START_OF_SPEECH,
            stt.SpeechEventType.END_OF_SPEECH,
            stt.SpeechEventType.FINAL_TRANSCRIPT,
        ]
        * 2
    )
    finals = [ev.alternatives[0].text for ev in events if ev.alternatives]
    assert wer(first, finals[0]) <= MAX_WER, finals
    assert wer(second, finals[1]) <= MAX_WER, finals


def test_only_english_is_offered() -> None:
    with pytest.raises(ValueError, match="English only"):
        WhisperOptions(language="fr")


def test_room_audio_reaches_whisper_as_16_khz_mono() -> None:
    stereo = rtc.AudioFrame(bytes(4 * 4800), ROOM_RATE, 2, 4800)
    mono = to_stt_rate(stereo)
    assert (mono.sample_rate, mono.num_channels) == (16000, 1)
    assert abs(mono.duration - 0.1) < 0.01


async def test_short_utterances_take_the_short_encoder_and_long_ones_the_whole_window() -> None:
    """Whisper's encoder normally runs on 30 s however short the sentence; ours encodes the
    sentence's own length first and keeps the result unless it looks invented."""
    whisper = models.whisper()
    retried = whisper.retried
    sentence = await speak(HibariTTS(), SENTENCES[0])
    short = bytes(to_stt_rate(sentence).data)
    text, _ = whisper.transcribe(short, "en")
    assert wer(SENTENCES[0], text) <= MAX_WER and whisper.retried == retried, text

    long_call = short * (int(models.SHORT_UTTERANCE_MAX_S / sentence.duration) + 1)
    text, _ = whisper.transcribe(long_call, "en")
    assert whisper.retried == retried, "past SHORT_UTTERANCE_MAX_S: straight to the window"
    assert text.lower().count("appointment") >= 2, text


def test_a_transcript_that_repeats_itself_or_outruns_the_audio_looks_invented() -> None:
    assert models.looks_invented("Yes. Yes.", 1.0)
    assert models.looks_invented("That's all, goodbye! Goodbye!", 2.0)
    assert models.looks_invented("I would like I would like", 3.0)
    assert models.looks_invented("one two three four five six seven eight nine ten", 1.0)
    assert models.looks_invented("", 1.0)
    assert models.looks_invented("Hello, what time are you open? Hello, What time are", 2.5)
    assert not models.looks_invented("My number is five five five, one two three four.", 3.5)
    assert not models.looks_invented("Hello, I would like to book an appointment.", 2.5)
