"""ScriptedLLM through livekit-agents' `llm.LLM` interface: intents, slots, chunks, tool calls."""

from __future__ import annotations

import json

import pytest
from livekit.agents import llm

from callboard.plugins.local import Intent, Script, ScriptedLLM, Slot

SCRIPT = Script(
    greeting="Thanks for calling Acme Dental. How can I help you today?",
    slots=(
        Slot(
            "day", r"\b(monday|tuesday|wednesday|thursday|friday)\b", prompt="Which day suits you?"
        ),
        Slot("name", r"\bmy name is (\w+)"),
    ),
    intents=(
        Intent(
            "book",
            (r"\bappointment\b", r"\bbook\b"),
            "You are booked for {day}.",
            requires=("day",),
            tool="book_visit",
            tool_arguments={"day": "{day}"},
            after_tool="Your confirmation number is {result}.",
        ),
        Intent("bye", (r"\b(bye|goodbye)\b",), "Goodbye!", tool="end_call"),
    ),
)


@llm.function_tool
async def end_call() -> None:
    """Hang up."""


@llm.function_tool
async def book_visit(day: str) -> str:
    """Book a visit on `day`."""
    return "A7"


async def reply(
    *caller: str, tools: list[llm.Tool] | None = None, ctx: llm.ChatContext | None = None
) -> tuple[list[str], list[llm.FunctionToolCall]]:
    ctx = ctx or llm.ChatContext()
    for text in caller:
        ctx.add_message(role="assistant", content="...")
        ctx.add_message(role="user", content=text)
    words: list[str] = []
    calls: list[llm.FunctionToolCall] = []
    async with ScriptedLLM(SCRIPT).chat(chat_ctx=ctx, tools=tools) as stream:
        async for chunk in stream:
            assert chunk.delta is not None
            if chunk.delta.content:
                words.append(chunk.delta.content)
            calls.extend(chunk.delta.tool_calls)
    return words, calls


async def test_greets_when_the_caller_has_not_spoken() -> None:
    words, calls = await reply()
    assert "".join(words) == SCRIPT.greeting
    assert calls == []


async def test_streams_the_reply_one_word_per_chunk() -> None:
    words, _ = await reply("I'd like an appointment on Tuesday")
    assert words == ["You ", "are ", "booked ", "for ", "Tuesday."]


async def test_asks_for_a_missing_slot_then_uses_what_the_caller_said_later() -> None:
    words, calls = await reply("I want to book an appointment", tools=[book_visit])
    assert "".join(words) == "Which day suits you?"
    assert calls == []

    words, calls = await reply("I want to book an appointment", "friday please", tools=[book_visit])
    assert "".join(words) == "You are booked for friday."
    assert [c.name for c in calls] == ["book_visit"]


async def test_calls_the_intents_tool_when_the_agent_has_it() -> None:
    _, calls = await reply("goodbye", tools=[end_call, book_visit])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("end_call", {})]

    _, calls = await reply("book me on Monday", tools=[end_call, book_visit])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("book_visit", {"day": "Monday"})]
    assert calls[0].call_id


async def test_skips_a_tool_the_agent_does_not_have() -> None:
    words, calls = await reply("bye")
    assert ("".join(words), calls) == ("Goodbye!", [])


async def test_answers_the_tools_result() -> None:
    ctx = llm.ChatContext()
    ctx.add_message(role="user", content="book me on Monday")
    ctx.insert(
        [
            llm.FunctionCall(call_id="c1", name="book_visit", arguments='{"day": "Monday"}'),
            llm.FunctionCallOutput(call_id="c1", name="book_visit", output="A7", is_error=False),
        ]
    )
    words, calls = await reply(ctx=ctx, tools=[book_visit])
    assert ("".join(words), calls) == ("Your confirmation number is A7.", [])


async def test_falls_back_when_no_intent_matches() -> None:
    words, _ = await reply("what is the weather like")
    assert "".join(words) == SCRIPT.fallback


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"intents": (Intent("a", ("x",), "{nope}"),)}, r"unknown slots \['nope'\]"),
        ({"intents": (Intent("a", ("x",), "hi", requires=("day",)),)}, "unknown slots"),
        ({"intents": (Intent("a", ("x",), "hi"), Intent("a", ("y",), "ho"))}, "duplicate intent"),
        ({"intents": (), "fallback": "Sorry {name}"}, "cannot use slots"),
    ],
)
def test_a_script_is_checked_when_built(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Script(greeting="Hi.", **kwargs)  # type: ignore[arg-type]


def test_bad_patterns_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        Intent("a", ("(",), "hi")
    with pytest.raises(ValueError, match="at least one pattern"):
        Intent("a", (), "hi")
    with pytest.raises(ValueError, match="must be an identifier"):
        Slot("first name", r"\w+")


def test_a_script_loads_from_plain_data_and_rejects_unknown_keys() -> None:
    data = {
        "greeting": "Hello.",
        "slots": [{"name": "day", "pattern": r"\b(monday|friday)\b"}],
        "intents": [{"name": "book", "patterns": ["book"], "reply": "Booked {day}."}],
    }
    script = Script.from_mapping(data)
    assert script.respond(["book friday"]).text == "Booked friday."
    with pytest.raises(ValueError, match=r"unknown keys \['intnets'\]"):
        Script.from_mapping({"greeting": "Hi.", "intnets": []})
