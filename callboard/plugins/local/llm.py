"""A deterministic, offline `llm.LLM`: answers from a `Script`, streamed word by word.

No chat model ships inside any installable package, so this is the offline default. With an
OpenAI-compatible endpoint, use livekit-plugins-openai instead (`openai.LLM(base_url=...,
model=...)`); nothing here changes.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Final, Never

from livekit.agents import llm, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions
from livekit.agents.types import NotGivenOr as NotGiven

from callboard.plugins.local.script import Script, Turn

_WORDS: Final = re.compile(r"\S+\s*")


def word_chunks(text: str) -> list[str]:
    """`text` as streamed: one chunk per word, each with its trailing space."""
    return _WORDS.findall(text)


class ScriptedLLM(llm.LLM[Never]):
    """Follows `script`: the caller's last message picks an intent, slots come from everything
    the caller said, and the reply streams as one chunk per word, then any tool call."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    @property
    def model(self) -> str:
        return "scripted"

    @property
    def provider(self) -> str:
        return "callboard"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGiven[bool] = NOT_GIVEN,
        tool_choice: NotGiven[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGiven[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        return ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)

    def turn_for(self, chat_ctx: llm.ChatContext, tools: list[llm.Tool]) -> Turn:
        """The script's answer to this chat context (also what a realtime model says)."""
        caller = [
            m.text_content or ""
            for m in chat_ctx.items
            if isinstance(m, llm.ChatMessage) and m.role == "user"
        ]
        last = chat_ctx.items[-1] if chat_ctx.items else None
        if isinstance(last, llm.FunctionCallOutput):
            return self.script.after_tool(caller, last.name, last.output)
        return self.script.respond(caller, tools=llm.tool_context.get_fnc_tool_names(tools))


class ScriptedStream(llm.LLMStream):
    def __init__(
        self,
        scripted: ScriptedLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(scripted, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._scripted = scripted

    async def _run(self) -> None:
        turn = self._scripted.turn_for(self._chat_ctx, self._tools)
        request_id = utils.shortuuid("scripted_")
        for word in word_chunks(turn.text):
            self._send(request_id, llm.ChoiceDelta(role="assistant", content=word))
            await asyncio.sleep(0)  # let the TTS start on the first sentence
        if turn.tool_call is not None:
            call = llm.FunctionToolCall(
                name=turn.tool_call.name,
                arguments=json.dumps(turn.tool_call.arguments),
                call_id=utils.shortuuid("call_"),
            )
            self._send(request_id, llm.ChoiceDelta(role="assistant", tool_calls=[call]))

    def _send(self, request_id: str, delta: llm.ChoiceDelta) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=delta))
