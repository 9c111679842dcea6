"""Work done once in the zygote, before it forks, whose result every job process shares.

A library registers a hook at import time (`before_fork(fn)`); the zygote runs the hooks once,
after it imported the agent and before its first fork, so what they load (a model, say) sits in
pages every child shares copy-on-write instead of being built again in each one. Elsewhere the
hooks never run and the library loads lazily as usual. A hook must leave no thread running.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

_hooks: list[Callable[[], object]] = []


def before_fork(hook: Callable[[], object]) -> None:
    """Run `hook` once in the zygote before it forks job processes (registering twice is one)."""
    if hook not in _hooks:
        _hooks.append(hook)


def run_before_fork_hooks() -> tuple[str, ...]:
    """Run every registered hook; a failing hook is reported, never fatal (each job process
    then does that work itself). Returns one line per failure."""
    failures = []
    for hook in _hooks:
        try:
            hook()
        except Exception as e:
            name = getattr(hook, "__qualname__", repr(hook))
            where = traceback.format_exception_only(type(e), e)[-1].strip()
            failures.append(f"{hook.__module__}.{name}: {where}")
    return tuple(failures)
