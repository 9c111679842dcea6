"""Audio plumbing for phone calls: 16-bit mono WAV files in and out, and resampling between
rates (a windowed-sinc low-pass, then linear interpolation: plenty for speech at 8–48 kHz)."""

from __future__ import annotations

import wave
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from callboard.server.sip.codecs import Pcm

LOWPASS_TAPS: Final = 63


@lru_cache(maxsize=16)
def _lowpass(cutoff: float) -> npt.NDArray[np.float64]:
    """A Hamming-windowed sinc low-pass; `cutoff` is a fraction of the sample rate."""
    n = np.arange(LOWPASS_TAPS) - (LOWPASS_TAPS - 1) / 2
    taps: npt.NDArray[np.float64] = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(LOWPASS_TAPS)
    normalized: npt.NDArray[np.float64] = taps / taps.sum()
    return normalized


def resample(pcm: Pcm, rate_in: int, rate_out: int) -> Pcm:
    """`pcm` at `rate_in` Hz as 16-bit samples at `rate_out` Hz."""
    if rate_in == rate_out or len(pcm) == 0:
        return pcm.astype(np.int16)
    signal = pcm.astype(np.float64)
    if rate_out < rate_in:  # keep what the new rate can carry
        signal = np.convolve(signal, _lowpass(0.45 * rate_out / rate_in), mode="same")
    count = round(len(pcm) * rate_out / rate_in)
    positions = np.arange(count) * (rate_in / rate_out)
    out = np.interp(positions, np.arange(len(signal)), signal)
    resampled: Pcm = np.clip(np.round(out), -32768, 32767).astype(np.int16)
    return resampled


def read_wav(path: Path, rate: int) -> Pcm:
    """A PCM WAV file (8/16-bit, any rate, channels mixed down) as 16-bit mono at `rate`."""
    with wave.open(str(path), "rb") as wav:
        width, channels, rate_in = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width == 2:
        samples = np.frombuffer(frames, dtype="<i2").astype(np.int32)
    elif width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.int32) - 128) << 8
    else:
        raise ValueError(f"{path}: {8 * width}-bit WAV; use 16-bit PCM")
    mono = samples.reshape(-1, channels).mean(axis=1)
    return resample(mono.astype(np.int16), rate_in, rate)


def write_wav(path: Path, pcm: Pcm, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
