"""An agent with function tools: it answers, takes a message, and ends the call itself by
deleting the room (`ctx.delete_room()`), which hangs up on a phone caller.

Written for livekit-agents and ported to callboard by one import (the marked line); offline
with callboard's local plugins, whose ScriptedLLM calls the tools its script names.

    python examples/hang_up.py dev
"""

from __future__ import annotations

import logging

from livekit.agents import Agent, AgentSession, RunContext, function_tool, get_job_context

from callboard import JobContext, JobProcess, WorkerOptions, cli  # was: from livekit.agents
from callboard.plugins import local

log = logging.getLogger("hang-up-agent")

SCRIPT = local.Script(
    greeting="Hello, you've reached Acme Dental after hours. Would you like to leave a message?",
    slots=(local.Slot("message", r"\bmessage (?:is|that) (.+)$"),),
    intents=(
        local.Intent(
            "message",
            (r"\bmessage\b",),
            "Got it, I'll pass that on.",
            requires=("message",),
            tool="take_message",
            tool_arguments={"text": "{message}"},
        ),
        local.Intent(
            "bye", (r"\b(bye|goodbye|no thanks|that's all)\b",), "Goodbye!", tool="end_call"
        ),
    ),
)


class AfterHours(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions="Take a message for the clinic, then end the call when the caller is done."
        )

    async def on_enter(self) -> None:
        self.session.generate_reply()

    @function_tool
    async def take_message(self, context: RunContext, text: str) -> str:
        """Record a message for the clinic's staff.

        Args:
            text: the caller's message
        """
        log.info("message taken", extra={"text": text})
        return "saved"

    @function_tool
    async def end_call(self, context: RunContext) -> None:
        """End the call once the caller has said goodbye."""
        await context.wait_for_playout()  # let the goodbye finish
        await get_job_context().delete_room()


def prewarm(proc: JobProcess) -> None:
    proc.userdata["vad"] = local.load_vad()


async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        vad=ctx.proc.userdata["vad"],
        stt=local.WhisperSTT(),
        llm=local.ScriptedLLM(SCRIPT),
        tts=local.offline_tts(),
    )
    await session.start(agent=AfterHours(), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm))
