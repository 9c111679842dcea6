"""WhisperSTT hears what the offline TTS says, per utterance and streaming through the VAD."""

from __future__ import annotations

import time

import pytest
from livekit import rtc
from livekit.agents import stt

from callboard.plugins.local import HibariTTS, WhisperOptions, WhisperSTT, load_vad, streaming_stt
from callboard.plugins.local.stt import to_stt_rate
from tests.plugins.support import MAX_WER, SENTENCES, in_frames, silence, speak, wer

ROOM_RATE = 48000


@pytest.mark.parametrize("sentence", SENTENCES)
async def test_recognizes_synthesized_speech_at_the_rooms_rate(sentence: str) -> None:
    audio = to_room_rate(await speak(HibariTTS(), sentence))

    started = time.perf_counter()
    event = await WhisperSTT().recognize(in_frames(audio))
    latency = time.perf_counter() - started

    assert event.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    heard = event.alternatives[0].text
    assert wer(sentence, heard) <= MAX_WER, heard
    assert 0.0 < event.alternatives[0].confidence <= 1.0
    print(f"stt {audio.duration:.2f} s of speech in {latency * 1000:.0f} ms: {heard!r}")


async def test_streams_one_final_transcript_per_utterance_through_the_vad() -> None:
    first, second = SENTENCES[0], SENTENCES[3]
    tts = HibariTTS()
    parts = [
        silence(0.5, ROOM_RATE),
        to_room_rate(await speak(tts, first)),
        silence(1.2, ROOM_RATE),
        to_room_rate(await speak(tts, second)),
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


def to_room_rate(audio: rtc.AudioFrame) -> rtc.AudioFrame:
    resampler = rtc.AudioResampler(audio.sample_rate, ROOM_RATE)
    return rtc.combine_audio_frames([*resampler.push(audio), *resampler.flush()])


def test_room_audio_reaches_whisper_as_16_khz_mono() -> None:
    stereo = rtc.AudioFrame(bytes(4 * 4800), ROOM_RATE, 2, 4800)
    mono = to_stt_rate(stereo)
    assert (mono.sample_rate, mono.num_channels) == (16000, 1)
    assert abs(mono.duration - 0.1) < 0.01
