"""The silero VAD finds each utterance in speech with pauses, at telephone and room rates."""

from __future__ import annotations

import pytest
from livekit.agents import vad

from callboard.plugins.local import HibariTTS, load_vad
from tests.plugins.support import SENTENCES, in_frames, resample, silence, speak, voiced_seconds

MAX_SEGMENT_ERROR = 0.25
"""Seconds a segment may differ from the loud part of the utterance (32 ms windows, padding)."""

ONE_SENTENCE_EACH = (SENTENCES[0], SENTENCES[1], SENTENCES[3])
"""hibari pauses ~0.6 s between sentences, which the VAD rightly hears as two utterances."""


@pytest.mark.parametrize("sample_rate", [8000, 48000])
async def test_one_segment_per_utterance_with_its_length(sample_rate: int) -> None:
    tts = HibariTTS()
    utterances = [resample(await speak(tts, s), sample_rate) for s in ONE_SENTENCE_EACH]
    stream = load_vad().stream()
    for utterance in utterances:
        for part in (silence(1.0, sample_rate), utterance):
            for frame in in_frames(part):
                stream.push_frame(frame)
    for frame in in_frames(silence(1.0, sample_rate)):
        stream.push_frame(frame)
    stream.end_input()

    events = [ev async for ev in stream if ev.type != vad.VADEventType.INFERENCE_DONE]

    assert [ev.type for ev in events] == [
        vad.VADEventType.START_OF_SPEECH,
        vad.VADEventType.END_OF_SPEECH,
    ] * len(utterances)
    ends = [ev for ev in events if ev.type == vad.VADEventType.END_OF_SPEECH]
    for end, utterance in zip(ends, utterances, strict=True):
        assert abs(end.speech_duration - voiced_seconds(utterance)) < MAX_SEGMENT_ERROR


async def test_vads_share_one_model_and_keep_their_own_silence_setting() -> None:
    """Loading is cheap after the first time (one onnxruntime session per process, built in the
    zygote under callboard's worker); each VAD still ends utterances after its own silence."""
    tts = HibariTTS()
    two_sentences = await speak(tts, f"{SENTENCES[0]} {SENTENCES[1]}")  # ~0.6 s pause inside
    eager, patient = load_vad(min_silence_duration=0.3), load_vad(min_silence_duration=1.0)
    assert eager.silero is patient.silero
    streams = [eager.stream(), patient.stream()]
    for part in (silence(0.5, 16000), two_sentences, silence(1.5, 16000)):
        for frame in in_frames(resample(part, 16000)):
            for stream in streams:
                stream.push_frame(frame)
    for stream in streams:
        stream.end_input()

    ends = [
        [ev async for ev in stream if ev.type == vad.VADEventType.END_OF_SPEECH]
        for stream in streams
    ]

    assert [len(e) for e in ends] == [2, 1]
