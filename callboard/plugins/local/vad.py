"""Voice activity detection: livekit-agents' own silero plugin.

`livekit-plugins-silero` ships the silero ONNX model inside its wheel and runs it with
onnxruntime (no torch), about 0.1 ms of CPU per 32 ms frame, so each call keeps its own
stream in its job process; only the model file is shared.
"""

from __future__ import annotations

from typing import Final

from livekit.agents import vad

from callboard.plugins.local.models import VOICE_EXTRA_HINT

MIN_SILENCE_DURATION: Final = 0.55
"""Silence that ends a caller's utterance (livekit's default; turn latency starts after it)."""


def load_vad(*, min_silence_duration: float = MIN_SILENCE_DURATION) -> vad.VAD:
    """silero VAD at 16 kHz; load it once per process (e.g. in the agent's prewarm)."""
    try:
        from livekit.plugins import silero
    except ImportError as e:
        raise ImportError(f"livekit-plugins-silero is missing: {VOICE_EXTRA_HINT}") from e
    loaded: vad.VAD = silero.VAD.load(min_silence_duration=min_silence_duration)
    return loaded
