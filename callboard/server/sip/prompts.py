"""What a caller hears while typing a PIN (livekit-sip plays recorded speech, `res/enter_pin.ogg`,
`wrong_pin.ogg`, `room_join.ogg`; the gateway has no voice, so each prompt is a short tone
pattern a person tells apart): 8 kHz PCM built once at import."""

from __future__ import annotations

from typing import Final

import numpy as np

from callboard.server.sip.codecs import SAMPLE_RATE, Pcm

AMPLITUDE: Final = 8000
FADE_SAMPLES: Final = 80
"""10 ms ramps at each end of a beep (no clicks)."""


def _beeps(*notes: tuple[float, float], gap_s: float = 0.08) -> Pcm:
    """(frequency Hz, seconds) beeps separated by `gap_s` of silence."""
    parts = []
    for hz, seconds in notes:
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        beep = AMPLITUDE * np.sin(2 * np.pi * hz * t)
        ramp = np.linspace(0.0, 1.0, FADE_SAMPLES)
        beep[:FADE_SAMPLES] *= ramp
        beep[-FADE_SAMPLES:] *= ramp[::-1]
        parts += [beep, np.zeros(int(gap_s * SAMPLE_RATE))]
    pcm: Pcm = np.concatenate(parts).astype(np.int16)
    return pcm


ENTER_PIN: Final = _beeps((660.0, 0.15), (880.0, 0.15))
"""Rising: type the PIN, then #."""
WRONG_PIN: Final = _beeps((440.0, 0.2), (330.0, 0.2), (220.0, 0.35))
"""Falling: refused, the call ends."""
ROOM_JOIN: Final = _beeps((880.0, 0.1))
"""One short beep: joining the room."""


def seconds(prompt: Pcm) -> float:
    return len(prompt) / SAMPLE_RATE
