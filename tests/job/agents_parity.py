"""Compares callboard's JobContext, JobProcess and JobRequest with livekit-agents' (1.8.9):
every public member of theirs must exist on ours, of the same kind, with a compatible signature.

Run as `python -m tests.job.agents_parity` (prints JSON: class -> member -> problem, "" when it
matches), in a subprocess: importing livekit.agents in the test process would give every THREAD
executor job there livekit-agents' context (callboard/job/flavour.py).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from typing import Any

CLASSES = ("JobContext", "JobProcess", "JobRequest")


def kind(member: Any) -> str:
    if isinstance(member, (property, functools.cached_property)):
        return "property"
    if isinstance(member, (staticmethod, classmethod)):
        return type(member).__name__
    # unwrapped: livekit-agents' @deprecate_params wraps `connect` in a plain function
    return "coroutine" if inspect.iscoroutinefunction(inspect.unwrap(member)) else "method"


def default(value: Any) -> Any:
    """A default as compared: a list and a tuple of the same items are the same default."""
    if value is inspect.Parameter.empty:
        return "<required>"
    return list(value) if isinstance(value, (list, tuple)) else value


def signature_problem(theirs: Any, ours: Any) -> str:
    t_params = list(inspect.signature(theirs).parameters.values())
    o_params = list(inspect.signature(ours).parameters.values())
    o_by_name = {p.name: p for p in o_params}
    for p in t_params:
        if p.kind == p.VAR_POSITIONAL:
            if not any(q.kind == q.VAR_POSITIONAL for q in o_params):
                return f"no *{p.name}"
            continue
        q = o_by_name.get(p.name)
        if q is None:
            return f"parameter {p.name!r} missing"
        if q.kind != p.kind:
            return f"parameter {p.name!r} is {q.kind.description}, theirs {p.kind.description}"
        if default(q.default) != default(p.default):
            return f"parameter {p.name!r} defaults to {q.default!r}, theirs {p.default!r}"
    extra = [q.name for q in o_params if q.name not in {p.name for p in t_params}]
    required_extra = [n for n in extra if o_by_name[n].default is inspect.Parameter.empty]
    if required_extra:
        return f"extra required parameters {required_extra}"
    positional = [
        p.name for p in t_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    ours_positional = [
        q.name for q in o_params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)
    ]
    if ours_positional[: len(positional)] != positional:
        return f"positional order {ours_positional}, theirs {positional}"
    return ""


def compare(theirs: type, ours: type) -> dict[str, str]:
    out = {}
    for name in sorted(n for n in dir(theirs) if not n.startswith("_")):
        t = inspect.getattr_static(theirs, name)
        try:
            o = inspect.getattr_static(ours, name)
        except AttributeError:
            out[name] = "missing"
            continue
        if kind(t) != kind(o):
            out[name] = f"is a {kind(o)}, theirs a {kind(t)}"
        elif kind(t) == "property":
            writable = getattr(t, "fset", None) is not None
            out[name] = "not assignable" if writable and getattr(o, "fset", None) is None else ""
        else:
            out[name] = signature_problem(t, o)
    return out


def main() -> int:
    from livekit.agents import job as theirs

    from callboard.job import context as ours

    report = {c: compare(getattr(theirs, c), getattr(ours, c)) for c in CLASSES}
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
