"""Phone numbers as LiveKit compares them (`livekit.NormalizeNumber` in livekit/protocol)."""

from __future__ import annotations

import re
from typing import Final

_NUMBER: Final = re.compile(r"^\+?[\d\- ()]+$")
_FORMATTING: Final = str.maketrans("", "", " -()")


def normalize_number(number: str) -> str:
    """`+` and digits for anything that looks like a phone number; other text unchanged."""
    if not number or not _NUMBER.match(number):
        return number
    digits = number.translate(_FORMATTING)
    return digits if digits.startswith("+") else "+" + digits


def number_in(number: str, allowed: list[str]) -> bool:
    """Whether `number` is one of `allowed` as written or once normalized; an empty list allows
    every number (livekit/protocol `matchNumbers`)."""
    if not allowed:
        return True
    norm = normalize_number(number)
    return any(number == a or norm == normalize_number(a) for a in allowed)
