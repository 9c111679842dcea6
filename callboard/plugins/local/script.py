"""What the scripted LLM says: intents matched by regular expressions, slots filled from what
the caller said, replies as templates, and optional tool calls. Pure and deterministic.

    Script(
        greeting="Thanks for calling Acme Dental. How can I help you today?",
        slots=(Slot("day", r"\\b(monday|tuesday|...)\\b", prompt="Which day suits you?"),),
        intents=(
            Intent("book", (r"\\bappointment\\b",), "You're booked for {day}.", requires=("day",)),
            Intent("bye", (r"\\bbye\\b",), "Goodbye!", tool="end_call"),
        ),
    )
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

DEFAULT_FALLBACK: Final = "Sorry, I didn't catch that. Could you say it again?"
RESULT_FIELD: Final = "result"
"""The placeholder an intent's `after_tool` template uses for the tool's return value."""


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{where}: invalid regular expression {pattern!r}: {e}") from None


def _fields(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{where}: invalid template {template!r}: {e}") from None


@dataclass(frozen=True)
class Slot:
    """A value taken from the caller's words: group 1 of `pattern` (or the whole match)."""

    name: str
    pattern: str
    prompt: str = ""
    """Asked when an intent requires this slot and the caller has not said it yet."""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"slot name {self.name!r} must be an identifier")
        _compile(self.pattern, f"slot {self.name}")

    def find(self, text: str) -> str | None:
        match = _compile(self.pattern, self.name).search(text)
        if match is None:
            return None
        return (match.group(1) if match.groups() else match.group(0)).strip()


@dataclass(frozen=True)
class Intent:
    """Matched when any pattern occurs in the caller's last message (case-insensitive)."""

    name: str
    patterns: tuple[str, ...]
    reply: str
    """Template over the slots, e.g. "Booked for {day}."."""
    requires: tuple[str, ...] = ()
    """Slots that must be known first; the first missing one's prompt is said instead."""
    tool: str | None = None
    """A function tool to call after the reply, e.g. "end_call" (skipped if the agent has none)."""
    tool_arguments: Mapping[str, str] = field(default_factory=dict)
    """Argument templates over the slots."""
    after_tool: str = ""
    """Said when the tool returns a value ({result} is that value); empty says nothing."""

    def __post_init__(self) -> None:
        where = f"intent {self.name}"
        if not self.patterns:
            raise ValueError(f"{where}: needs at least one pattern")
        for pattern in self.patterns:
            _compile(pattern, where)

    def matches(self, text: str) -> bool:
        return any(_compile(p, self.name).search(text) for p in self.patterns)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, str]


@dataclass(frozen=True)
class Turn:
    """What the agent does for one chat request: say `text`, then maybe call a tool."""

    text: str
    intent: str | None = None
    tool_call: ToolCall | None = None


@dataclass(frozen=True)
class Script:
    """A whole conversation's rules, validated at construction."""

    greeting: str
    """Said when the agent speaks first (no caller message yet)."""
    intents: tuple[Intent, ...]
    slots: tuple[Slot, ...] = ()
    fallback: str = DEFAULT_FALLBACK
    """Said when no intent matches."""

    def __post_init__(self) -> None:
        slot_names = [s.name for s in self.slots]
        _unique(slot_names, "slot")
        _unique([i.name for i in self.intents], "intent")
        known = set(slot_names)
        for intent in self.intents:
            where = f"intent {intent.name}"
            unknown = set(intent.requires) - known
            templates = [intent.reply, *intent.tool_arguments.values()]
            for template in templates:
                unknown |= _fields(template, where) - known
            unknown |= _fields(intent.after_tool, where) - known - {RESULT_FIELD}
            if unknown:
                raise ValueError(f"{where}: unknown slots {sorted(unknown)}")
        for template, where in ((self.greeting, "greeting"), (self.fallback, "fallback")):
            if _fields(template, where):
                raise ValueError(f"{where} cannot use slots: {template!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Script:
        """A script from plain data (e.g. parsed JSON); unknown keys are rejected."""
        _reject_unknown(data, {"greeting", "intents", "slots", "fallback"}, "script")
        slots = tuple(
            Slot(**_only(s, {"name", "pattern", "prompt"}, "slot")) for s in data.get("slots", ())
        )
        intent_keys = {"name", "patterns", "reply", "requires", "tool", "tool_arguments"}
        intents = []
        for raw in data.get("intents", ()):
            values = dict(_only(raw, intent_keys | {"after_tool"}, "intent"))
            values["patterns"] = tuple(values.get("patterns", ()))
            values["requires"] = tuple(values.get("requires", ()))
            intents.append(Intent(**values))
        extra = {"fallback": data["fallback"]} if "fallback" in data else {}
        return cls(greeting=data["greeting"], intents=tuple(intents), slots=slots, **extra)

    def slot_values(self, caller_messages: Iterable[str]) -> dict[str, str]:
        """Each slot's latest value over the conversation so far."""
        values: dict[str, str] = {}
        for text in caller_messages:
            for slot in self.slots:
                value = slot.find(text)
                if value is not None:
                    values[slot.name] = value
        return values

    def intent_for(self, text: str) -> Intent | None:
        return next((i for i in self.intents if i.matches(text)), None)

    def current_intent(self, caller_messages: list[str]) -> Intent | None:
        """The intent of the last message, or the one it answers: a message that matches
        nothing continues the previous intent if that one was waiting for a slot."""
        if not caller_messages:
            return None
        intent = self.intent_for(caller_messages[-1])
        if intent is None and len(caller_messages) > 1:
            earlier = caller_messages[:-1]
            pending = self.intent_for(earlier[-1])
            if pending is not None and self._missing(pending, self.slot_values(earlier)):
                return pending
        return intent

    @staticmethod
    def _missing(intent: Intent, values: Mapping[str, str]) -> list[str]:
        return [name for name in intent.requires if name not in values]

    def respond(self, caller_messages: list[str], tools: Iterable[str] = ()) -> Turn:
        """The agent's turn after the caller said `caller_messages[-1]`."""
        if not caller_messages:
            return Turn(self.greeting)
        intent = self.current_intent(caller_messages)
        if intent is None:
            return Turn(self.fallback)
        values = self.slot_values(caller_messages)
        missing = self._missing(intent, values)
        if missing:
            slot = next(s for s in self.slots if s.name == missing[0])
            return Turn(slot.prompt or self.fallback, intent=intent.name)
        call = None
        if intent.tool is not None and intent.tool in set(tools):
            arguments = {k: v.format(**values) for k, v in intent.tool_arguments.items()}
            call = ToolCall(intent.tool, arguments)
        return Turn(intent.reply.format(**values), intent=intent.name, tool_call=call)

    def after_tool(self, caller_messages: list[str], tool: str, result: str) -> Turn:
        """The agent's words once `tool` returned `result` (often nothing)."""
        intent = self.current_intent(caller_messages)
        if intent is None or intent.tool != tool or not intent.after_tool:
            return Turn("")
        values = self.slot_values(caller_messages)
        return Turn(intent.after_tool.format(**values, result=result), intent=intent.name)


def _unique(names: list[str], kind: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate {kind} names: {duplicates}")


def _reject_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> Mapping[str, Any]:
    _reject_unknown(data, allowed, where)
    return data
