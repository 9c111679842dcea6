"""Offline voice plugins for livekit-agents: no cloud account, no key, no model download.

    from callboard.plugins import local

    session = AgentSession(
        vad=local.load_vad(),          # silero's model (livekit-plugins-silero)
        stt=local.WhisperSTT(),        # Whisper tiny.en, shared by the worker's jobs
        llm=local.ScriptedLLM(script), # deterministic intents, slots and tool calls
        tts=local.offline_tts(),       # hibari, then espeak-ng if installed
    )

Import this package at the top of the agent module: that registers the models with the
worker's inference process, so they load once per worker rather than once per call.
Needs the `voice` extra: pip install 'callboard[voice]'.
"""

from __future__ import annotations

from callboard.plugins.local import runners as _runners  # registers the shared models
from callboard.plugins.local.llm import ScriptedLLM
from callboard.plugins.local.realtime import ScriptedRealtimeModel
from callboard.plugins.local.script import Intent, Script, Slot
from callboard.plugins.local.stt import WhisperOptions, WhisperSTT, streaming_stt
from callboard.plugins.local.tts import (
    EspeakOptions,
    EspeakTTS,
    HibariOptions,
    HibariTTS,
    offline_tts,
)
from callboard.plugins.local.vad import SileroVAD, VADOptions, load_vad

__all__ = [
    "EspeakOptions",
    "EspeakTTS",
    "HibariOptions",
    "HibariTTS",
    "Intent",
    "Script",
    "ScriptedLLM",
    "ScriptedRealtimeModel",
    "SileroVAD",
    "Slot",
    "VADOptions",
    "WhisperOptions",
    "WhisperSTT",
    "load_vad",
    "offline_tts",
    "streaming_stt",
]
del _runners
