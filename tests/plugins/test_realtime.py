"""The seed's realtime failure mode, offline: a realtime model that declares audio but answers a
turn in text. livekit-agents 1.8.9 then speaks the text with the session's TTS (and warns), or,
with no TTS, logs an error and the caller hears nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest
from livekit.agents import Agent, AgentSession, llm
from livekit.agents.voice.events import ConversationItemAddedEvent

from callboard.plugins.local import HibariTTS, Intent, Script, WhisperSTT, load_vad, offline_tts
from callboard.plugins.local.realtime import PROVIDER_LABEL, ScriptedRealtimeModel
from tests.plugins.sessions import CALLER_RATE, Caller, Recorder
from tests.plugins.support import MAX_WER, resample, speak, wer

TURN_TIMEOUT = 90.0
"""Generous: on a loaded 2-core machine one turn (VAD, Whisper, TTS) has taken over 10 s."""
SESSION_TEST_TIMEOUT = 300
REPLY = "Sure, Tuesday morning works."
SCRIPT = Script(greeting="Hello.", intents=(Intent("book", (r"\bappointment\b",), REPLY),))
CALLER_LINE = "I would like an appointment on Tuesday."

# livekit-agents 1.8.9, voice/agent_activity.py, _realtime_generation_task_impl
FELL_BACK_TO_TTS = "text response received from realtime API, falling back to use a TTS model."
NO_TTS_ERROR = (
    "Text message received from Realtime API with audio modality. "
    "This usually happens when text chat context is synced to the API. "
    "Try to add a TTS model as fallback or use text modality with TTS instead."
)
PLUGIN_WARNING = f"Text response received from {PROVIDER_LABEL} in audio modality."


class Listener:
    """What the caller was heard saying and what the agent said."""

    def __init__(self, session: AgentSession[None]) -> None:
        self.said: list[str] = []
        self.heard: list[str] = []
        session.on("conversation_item_added", self._on_item)
        session.on("user_input_transcribed", lambda ev: self.heard.append(ev.transcript))

    def _on_item(self, ev: ConversationItemAddedEvent) -> None:
        if isinstance(ev.item, llm.ChatMessage) and ev.item.role == "assistant":
            self.said.append(ev.item.text_content or "")


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.mark.timeout(SESSION_TEST_TIMEOUT)
async def test_a_text_answer_is_spoken_by_the_sessions_tts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caller, recorder = Caller(), Recorder()
    session: AgentSession[None] = AgentSession(
        vad=load_vad(),
        llm=ScriptedRealtimeModel(SCRIPT),
        tts=offline_tts(),
        turn_handling={"turn_detection": "vad"},
    )
    listener = Listener(session)
    session.input.audio, session.output.audio = caller, recorder
    line = resample(await speak(HibariTTS(), CALLER_LINE), CALLER_RATE)

    with caplog.at_level(logging.WARNING):
        await session.start(Agent(instructions="Answer from the script."))
        try:
            caller.say(line)
            await asyncio.wait_for(recorder.wait_played(1), TURN_TIMEOUT)
        finally:
            await session.aclose()

    warnings = messages(caplog, logging.WARNING)
    assert PLUGIN_WARNING in warnings
    assert FELL_BACK_TO_TTS in warnings
    assert NO_TTS_ERROR not in messages(caplog, logging.ERROR)
    assert wer(CALLER_LINE, " ".join(listener.heard)) <= MAX_WER, listener.heard
    assert listener.said == [REPLY]
    spoken = (await WhisperSTT().recognize(recorder.segments[0].audio())).alternatives[0].text
    assert wer(REPLY, spoken) <= MAX_WER, spoken


@pytest.mark.timeout(SESSION_TEST_TIMEOUT)
async def test_without_a_tts_the_text_answer_is_an_error_and_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    session: AgentSession[None] = AgentSession(llm=ScriptedRealtimeModel(SCRIPT))
    listener = Listener(session)
    session.output.audio = recorder

    with caplog.at_level(logging.WARNING):
        await session.start(Agent(instructions="Answer from the script."))
        try:
            reply = session.generate_reply(user_input=CALLER_LINE)
            await asyncio.wait_for(reply.wait_for_playout(), TURN_TIMEOUT)
        finally:
            await session.aclose()

    assert NO_TTS_ERROR in messages(caplog, logging.ERROR)
    assert FELL_BACK_TO_TTS not in messages(caplog, logging.WARNING)
    assert listener.said == [REPLY]  # in the transcript ...
    assert recorder.segments == []  # ... but never heard
