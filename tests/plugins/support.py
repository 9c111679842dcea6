"""Speech for the plugin tests: synthesized with the real TTS, scored with word error rate."""

from __future__ import annotations

import av
import numpy as np
import pytest
from livekit import rtc
from livekit.agents import tts

from callboard.plugins.local import EspeakTTS
from callboard.voice_caller import word_error_rate as wer  # noqa: F401 (the tests' scorer)

SENTENCES = (
    "Hello, I would like to book an appointment for tomorrow morning.",
    "My name is Alice Johnson.",
    "Thanks for calling Acme Dental. How can I help you today?",
    "Can you come in on Tuesday afternoon?",
)
needs_espeak = pytest.mark.skipif(
    not EspeakTTS.available(), reason="espeak-ng missing: apt-get install espeak-ng"
)
MAX_WER = 0.2
PHONE_RATE = 8000
ESPEAK_MAX_WER = 0.35
"""espeak-ng is the robotic last resort: understood, not word-perfect (WER ≈ 0.15 measured)."""


async def speak(engine: tts.TTS, text: str) -> rtc.AudioFrame:
    frames = [ev.frame async for ev in engine.synthesize(text)]
    return rtc.combine_audio_frames(frames)


def resample(audio: rtc.AudioFrame, rate: int) -> rtc.AudioFrame:
    resampler = rtc.AudioResampler(audio.sample_rate, rate)
    return rtc.combine_audio_frames([*resampler.push(audio), *resampler.flush()])


def silence(seconds: float, sample_rate: int) -> rtc.AudioFrame:
    samples = int(seconds * sample_rate)
    return rtc.AudioFrame(bytes(2 * samples), sample_rate, 1, samples)


def in_frames(audio: rtc.AudioFrame, ms: int = 20) -> list[rtc.AudioFrame]:
    """`audio` cut into `ms` frames, as a room track delivers it."""
    step = audio.sample_rate * ms // 1000
    pcm = np.frombuffer(audio.data, dtype=np.int16)
    return [
        rtc.AudioFrame(pcm[i : i + step].tobytes(), audio.sample_rate, 1, len(pcm[i : i + step]))
        for i in range(0, len(pcm), step)
    ]


def rms(audio: rtc.AudioFrame) -> float:
    pcm = np.frombuffer(audio.data, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(pcm**2))) if len(pcm) else 0.0


def voiced_seconds(audio: rtc.AudioFrame, threshold: float = 0.02) -> float:
    """Time from the first to the last sample louder than `threshold` of full scale."""
    pcm = np.abs(np.frombuffer(audio.data, dtype=np.int16).astype(np.float64)) / 32768.0
    loud = np.flatnonzero(pcm > threshold)
    return float((loud[-1] - loud[0]) / audio.sample_rate) if len(loud) else 0.0


def through_phone_line(audio: rtc.AudioFrame) -> rtc.AudioFrame:
    """`audio` as a G.711 µ-law call carries it: 8 kHz, companded by PyAV's pcm_mulaw codec."""
    narrow = resample(audio, PHONE_RATE)
    encoder = av.CodecContext.create("pcm_mulaw", "w")
    encoder.sample_rate, encoder.layout, encoder.format = PHONE_RATE, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(
        np.frombuffer(narrow.data, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = PHONE_RATE
    decoder = av.CodecContext.create("pcm_mulaw", "r")
    decoder.sample_rate, decoder.layout = PHONE_RATE, "mono"
    pcm = b"".join(
        bytes(decoded.to_ndarray().astype(np.int16).tobytes())
        for packet in [*encoder.encode(frame), *encoder.encode(None)]
        for decoded in decoder.decode(packet)
    )
    return rtc.AudioFrame(pcm, PHONE_RATE, 1, len(pcm) // 2)
