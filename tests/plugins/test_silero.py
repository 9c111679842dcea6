"""The silero model's plumbing: audio resampled for it across frames, and each window run once
for every stream that follows the same audio."""

from __future__ import annotations

import numpy as np
import pytest

from callboard.plugins.local.silero import LinearResampler, Windows
from callboard.plugins.local.vad import VADOptions, load_vad, shared_model


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 16000), (48000, 16000), (8000, 16000)])
def test_resampling_in_uneven_frames_equals_resampling_at_once(in_rate: int, out_rate: int) -> None:
    audio = tone(1.0, in_rate)
    whole = LinearResampler(in_rate, out_rate).push(audio)
    chunked = LinearResampler(in_rate, out_rate)
    cuts = np.cumsum([7, 480, 1, 333, 960, 1200])
    parts = [chunked.push(part) for part in np.split(audio, cuts[cuts < len(audio)])]

    assert abs(len(whole) - out_rate) <= 1
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)


def test_streams_over_the_same_audio_run_the_model_once_per_window() -> None:
    model = shared_model()
    audio = LinearResampler(16000, 16000).push(tone(0.5, 16000))
    first, second = Windows(model, 16000), Windows(model, 16000)
    runs, reused = model.runs, model.reused

    assert first.push(audio) == second.push(audio)
    windows = len(audio) // first.size
    assert (model.runs - runs, model.reused - reused) == (windows, windows)

    other = Windows(model, 16000)
    other.push(audio[: first.size] * 0.5)
    assert model.runs - runs == windows + 1


def test_options_are_checked_and_updated_for_every_stream() -> None:
    with pytest.raises(ValueError, match="8000 or 16000"):
        VADOptions(sample_rate=22050)
    with pytest.raises(ValueError, match="deactivation_threshold"):
        VADOptions(deactivation_threshold=0.0)
    detector = load_vad(min_silence_duration=0.3)
    assert detector.min_silence_duration == 0.3
    detector.update_options(min_silence_duration=0.8, activation_threshold=0.6)
    assert detector.min_silence_duration == 0.8
    assert detector.options.exit_threshold == pytest.approx(0.45)
