"""An agent module that registers a before-fork hook (a separate module: importing it makes
every zygote that imports it run the hook)."""

from __future__ import annotations

import os

from callboard import JobContext
from callboard.job.preload import before_fork

OUT_ENV = "CALLBOARD_TEST_PRELOAD_OUT"

_model_built_in: int | None = None
"""The pid of the process that built the 'model' (the zygote, when the hook ran there)."""


def _build_model() -> None:
    global _model_built_in
    _model_built_in = os.getpid()
    with open(os.environ[OUT_ENV], "a") as out:
        out.write(f"hook {os.getpid()}\n")


def _failing_hook() -> None:
    raise OSError("model file unreadable")


before_fork(_build_model)
before_fork(_failing_hook)


async def uses_model(ctx: JobContext) -> None:
    with open(os.environ[OUT_ENV], "a") as out:  # noqa: ASYNC230 (tiny test write)
        out.write(f"entry {os.getpid()} {_model_built_in}\n")
