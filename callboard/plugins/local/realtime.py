"""An offline realtime model that answers in text although it declares audio output.

Cloud realtime APIs do this when text chat history was synced into them (the OpenAI plugin
then logs "Text response received from OpenAI Realtime API in audio modality."). livekit-agents
handles it in `AgentActivity`: with a TTS on the session it warns and speaks the text with the
TTS; without one it logs an error and the caller hears nothing. This model reproduces that turn
on demand, deterministically: Whisper hears the caller, the script answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, Final, Literal, Never

from livekit import rtc
from livekit.agents import llm, utils
from livekit.agents.types import NOT_GIVEN, NotGivenOr

from callboard.log import get_logger
from callboard.plugins.local.llm import ScriptedLLM, word_chunks
from callboard.plugins.local.script import Script
from callboard.plugins.local.stt import WhisperSTT

log = get_logger("plugins.local")

PROVIDER_LABEL: Final = "callboard scripted realtime model"
MAX_BUFFERED_SECONDS: Final = 30.0
"""Caller audio kept until the session commits a turn (older audio is dropped)."""


class ScriptedRealtimeModel(llm.RealtimeModel):
    """Declares audio output, answers every turn with a text-only message from `script`."""

    def __init__(self, script: Script) -> None:
        super().__init__(
            capabilities=llm.RealtimeCapabilities(
                message_truncation=False,
                turn_detection=False,  # the AgentSession's VAD ends the caller's turns
                user_transcription=True,
                auto_tool_reply_generation=False,
                audio_output=True,
                manual_function_calls=False,
                mutable_chat_context=True,
                mutable_instructions=True,
                mutable_tools=True,
            )
        )
        self.script = script

    @property
    def model(self) -> str:
        return "scripted-realtime"

    @property
    def provider(self) -> str:
        return "callboard"

    def session(self, *, turn_detection_disabled: bool = False) -> ScriptedRealtimeSession:
        return ScriptedRealtimeSession(self)

    async def aclose(self) -> None:
        pass


class ScriptedRealtimeSession(llm.RealtimeSession[Never]):
    def __init__(self, model: ScriptedRealtimeModel) -> None:
        super().__init__(model)
        self._scripted = ScriptedLLM(model.script)
        self._stt = WhisperSTT()
        self._chat_ctx = llm.ChatContext.empty()
        self._tools = llm.ToolContext.empty()
        self._audio: list[rtc.AudioFrame] = []
        self._transcribing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def chat_ctx(self) -> llm.ChatContext:
        return self._chat_ctx.copy()

    @property
    def tools(self) -> llm.ToolContext:
        return self._tools.copy()

    async def update_instructions(self, instructions: str) -> None:
        pass  # the script is the instructions

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        self._chat_ctx = chat_ctx.copy()

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        self._tools = llm.ToolContext(tools)

    def update_options(self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN) -> None:
        pass

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        self._audio.append(frame)
        while sum(f.duration for f in self._audio) > MAX_BUFFERED_SECONDS:
            self._audio.pop(0)

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass

    def commit_audio(self) -> None:
        frames, self._audio = self._audio, []
        if frames:
            self._transcribing = self._spawn(self._transcribe(frames))

    def clear_audio(self) -> None:
        self._audio = []

    def interrupt(self) -> None:
        pass  # a reply is produced at once; there is nothing left to stop

    def truncate(
        self,
        *,
        message_id: str,
        modalities: list[Literal["text", "audio"]],
        audio_end_ms: int,
        audio_transcript: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        pass

    def generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN,
    ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        reply: asyncio.Future[llm.GenerationCreatedEvent] = asyncio.Future()
        self._spawn(self._reply(reply))
        return reply

    async def aclose(self) -> None:
        await utils.aio.cancel_and_wait(*self._tasks)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _transcribe(self, frames: list[rtc.AudioFrame]) -> None:
        event = await self._stt.recognize(frames)
        text = event.alternatives[0].text if event.alternatives else ""
        if not text:
            return
        message = self._chat_ctx.add_message(role="user", content=text)
        self.emit(
            "input_audio_transcription_completed",
            llm.InputTranscriptionCompleted(
                item_id=message.id,
                transcript=text,
                is_final=True,
                confidence=event.alternatives[0].confidence,
            ),
        )

    async def _reply(self, reply: asyncio.Future[llm.GenerationCreatedEvent]) -> None:
        try:
            if self._transcribing is not None:
                await self._transcribing
            generation = self._text_only_generation()
        except Exception as e:  # the session logs it and ends the turn: it must not hang
            if not reply.done():
                reply.set_exception(llm.RealtimeError(f"{PROVIDER_LABEL} failed: {e}"))
            return
        if not reply.done():
            reply.set_result(generation)

    def _text_only_generation(self) -> llm.GenerationCreatedEvent:
        """The script's answer as one message that carries text and no audio."""
        turn = self._scripted.turn_for(self._chat_ctx, self._tools.flatten())
        message_id = utils.shortuuid("msg_")
        log.warning(f"Text response received from {PROVIDER_LABEL} in audio modality.")

        text: utils.aio.Chan[str] = utils.aio.Chan()
        for word in word_chunks(turn.text):
            text.send_nowait(word)
        text.close()
        audio: utils.aio.Chan[rtc.AudioFrame] = utils.aio.Chan()
        audio.close()
        modalities: asyncio.Future[list[Literal["text", "audio"]]] = asyncio.Future()
        modalities.set_result(["text"])
        messages: utils.aio.Chan[llm.MessageGeneration] = utils.aio.Chan()
        messages.send_nowait(llm.MessageGeneration(message_id, text, audio, modalities))
        messages.close()

        functions: utils.aio.Chan[llm.FunctionCall] = utils.aio.Chan()
        if turn.tool_call is not None:
            functions.send_nowait(
                llm.FunctionCall(
                    call_id=utils.shortuuid("call_"),
                    name=turn.tool_call.name,
                    arguments=json.dumps(turn.tool_call.arguments),
                )
            )
        functions.close()
        self._chat_ctx.add_message(role="assistant", content=turn.text, id=message_id)
        return llm.GenerationCreatedEvent(
            message_stream=messages, function_stream=functions, user_initiated=True
        )
