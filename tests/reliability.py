"""Figures for docs/RELIABILITY.md: reliability tests append what they proved to a JSON-lines
file when CALLBOARD_RELIABILITY_OUT names a directory (scripts/reliability_report.py sets it);
otherwise `record` does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

OUT_ENV: Final = "CALLBOARD_RELIABILITY_OUT"
RESULTS_FILE: Final = "results.jsonl"


def record(kind: str, data: dict[str, Any]) -> None:
    """Append `{"kind": kind, **data}` to the results file, if one was asked for."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    path = Path(out) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, **data}) + "\n")


def env_int(name: str, default: int) -> int:
    """An integer from the environment (the long forms), or `default` (the CI short forms)."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default
