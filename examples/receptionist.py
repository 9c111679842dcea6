"""A phone receptionist for a dental clinic: livekit-agents' AgentSession with room IO, a VAD,
STT, LLM and TTS (and LiveKit's turn detector where it is installed).

Written for livekit-agents and ported to callboard by one import (the marked line). It runs
offline with callboard's local plugins; with cloud accounts, swap the four models for your
plugins (e.g. `deepgram.STT()`, `openai.LLM()`, `cartesia.TTS()`): nothing else changes.

    python examples/receptionist.py dev          # LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET
    python examples/receptionist.py connect --room r1
"""

from __future__ import annotations

from typing import Any

from livekit.agents import Agent, AgentSession, TurnHandlingOptions

from callboard import JobContext, JobProcess, WorkerOptions, cli  # was: from livekit.agents
from callboard.plugins import local

CLINIC_SCRIPT = local.Script(
    greeting="Thanks for calling Acme Dental. How can I help you today?",
    slots=(
        local.Slot(
            "day",
            r"\b(monday|tuesday|wednesday|thursday|friday|tomorrow)\b",
            prompt="Which day would suit you?",
        ),
    ),
    intents=(
        local.Intent(
            "book",
            (r"\b(appointment|book|booking|check-?up|cleaning)\b",),
            "Great, you're booked in for {day}. Is there anything else?",
            requires=("day",),
        ),
        local.Intent("hours", (r"\b(open|hours|close)\b",), "We're open nine to five, weekdays."),
        local.Intent("bye", (r"\b(bye|goodbye|that's all)\b",), "Thanks for calling. Goodbye!"),
    ),
)
"""What the offline ScriptedLLM says; with a real LLM, these become the agent's instructions."""


class Receptionist(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions=(
                "You are the receptionist of Acme Dental. Greet callers, book appointments "
                "(ask for the day), and answer questions about opening hours. Be brief."
            )
        )

    async def on_enter(self) -> None:
        self.session.generate_reply()  # the greeting


def turn_detection() -> Any:
    """LiveKit's turn detector where it (and its model: `download-files`) is installed, else
    end of turn by the VAD's silence."""
    try:
        from livekit.plugins.turn_detector.english import EnglishModel
    except ImportError:
        return "vad"
    return EnglishModel()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = local.load_vad()


def new_session(proc: JobProcess) -> AgentSession[None]:
    return AgentSession(
        vad=proc.userdata["vad"],
        stt=local.WhisperSTT(),
        llm=local.ScriptedLLM(CLINIC_SCRIPT),
        tts=local.offline_tts(),
        turn_handling=TurnHandlingOptions(turn_detection=turn_detection()),
    )


async def entrypoint(ctx: JobContext) -> None:
    session = new_session(ctx.proc)
    # start() joins the room (ctx.connect()) and closes the session when the job shuts down
    await session.start(agent=Receptionist(), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm))
