"""The four plugins in one livekit-agents AgentSession: the caller's words are transcribed, the
script answers, the answer is spoken (and understood when transcribed back), the scripted
goodbye calls the agent's end_call tool, and the session's two VAD streams share one inference
per window."""

from __future__ import annotations

import asyncio

import pytest
from livekit.agents import Agent, AgentSession, llm
from livekit.agents.voice.events import ConversationItemAddedEvent

from callboard.plugins.local import (
    HibariTTS,
    Intent,
    Script,
    ScriptedLLM,
    Slot,
    WhisperSTT,
    load_vad,
    offline_tts,
)
from tests.plugins.sessions import CALLER_RATE, Caller, Recorder
from tests.plugins.support import MAX_WER, resample, speak, wer

TURN_TIMEOUT = 90.0
"""Generous: on a loaded 2-core machine one turn (VAD, Whisper, TTS) has taken over 10 s."""
SESSION_TEST_TIMEOUT = 300
SCRIPT = Script(
    greeting="Thanks for calling Acme Dental. How can I help you today?",
    slots=(Slot("day", r"\b(monday|tuesday|wednesday|thursday|friday)\b"),),
    intents=(
        Intent(
            "book",
            (r"\bappointment\b",),
            "Sure, I booked you for {day} morning.",
            requires=("day",),
        ),
        Intent("bye", (r"\b(bye|goodbye)\b",), "Goodbye, have a nice day.", tool="end_call"),
    ),
)
SHARED_WINDOWS = 0.9
"""Of the windows the VAD model ran, the fraction the session's second VAD stream reused."""
CALLER_LINES = ("I would like an appointment on Tuesday, please.", "That's all, goodbye.")


class Receptionist(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="Answer from the script.")
        self.ended = asyncio.Event()

    async def on_enter(self) -> None:
        self.session.generate_reply()

    @llm.function_tool
    async def end_call(self) -> None:
        """End the call."""
        self.ended.set()


@pytest.mark.timeout(SESSION_TEST_TIMEOUT)
async def test_a_spoken_conversation_through_the_offline_plugins() -> None:
    caller, recorder = Caller(), Recorder()
    vad = load_vad()
    runs, reused = vad.silero.runs, vad.silero.reused
    session: AgentSession[None] = AgentSession(
        vad=vad,
        stt=WhisperSTT(),
        llm=ScriptedLLM(SCRIPT),
        tts=offline_tts(),
        turn_handling={"turn_detection": "vad"},
    )
    heard: list[str] = []
    said: list[str] = []
    session.on(
        "user_input_transcribed",
        lambda ev: heard.append(ev.transcript) if ev.is_final else None,
    )
    session.on("conversation_item_added", lambda ev: _said(ev, said))
    session.input.audio = caller
    session.output.audio = recorder
    agent = Receptionist()
    voice = HibariTTS()
    lines = [resample(await speak(voice, line), CALLER_RATE) for line in CALLER_LINES]

    turns: list[list[str]] = []  # the caller's final transcripts, per line said
    await session.start(agent)
    try:
        await asyncio.wait_for(recorder.wait_played(1), TURN_TIMEOUT)  # the greeting
        for replies, line in enumerate(lines, 2):
            heard.clear()
            caller.say(line)
            await asyncio.wait_for(recorder.wait_played(replies), TURN_TIMEOUT)
            turns.append(list(heard))
            latency = recorder.segments[-1].first_audio_at - caller.speech_ended_at
            print(f"turn latency (end of speech to first agent audio): {latency * 1000:.0f} ms")
        await asyncio.wait_for(agent.ended.wait(), TURN_TIMEOUT)
    finally:
        await session.aclose()
    runs, reused = vad.silero.runs - runs, vad.silero.reused - reused
    print(f"VAD windows: {runs} run, {reused} reused")
    # the session's turn detection and its STT's segmentation follow the same audio: the model
    # runs once per window for both
    assert reused >= SHARED_WINDOWS * runs > 0

    for line, transcripts in zip(CALLER_LINES, turns, strict=True):
        assert wer(line, " ".join(transcripts)) <= MAX_WER, (line, transcripts)
    assert said == [
        SCRIPT.greeting,
        "Sure, I booked you for Tuesday morning.",
        "Goodbye, have a nice day.",
    ], turns
    stt = WhisperSTT()
    for text, segment in zip(said, recorder.segments, strict=True):
        spoken = (await stt.recognize(segment.audio())).alternatives[0].text
        assert wer(text, spoken) <= MAX_WER, (text, spoken)


def _said(ev: ConversationItemAddedEvent, said: list[str]) -> None:
    if isinstance(ev.item, llm.ChatMessage) and ev.item.role == "assistant":
        said.append(ev.item.text_content or "")
