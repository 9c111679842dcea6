"""The agent script of the receptionist acceptance test: runs examples/receptionist.py (or its
copy with livekit-agents' import, RECEPTIONIST_FILE) under callboard's or livekit-agents' worker
(RECEPTIONIST_SIDE), and records what the job sees as JSON lines in RECEPTIONIST_REPORT.

    python tests/interop/agents/receptionist_probe.py start

It registers a small inference runner of its own, the way livekit-agents' plugins register theirs
(the turn detector's weights come from a model hub, unreachable here), and records: the job
context (`get_job_context()`, `http_session()`, that runner through `ctx.inference_executor`),
then the example's AgentSession as it runs (agent states, final transcripts, chat items, the
close event) and the job's shutdown.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from types import ModuleType
from typing import Any, Final

from livekit.agents import get_job_context
from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.utils import http_context

from tests.interop.agents.receptionist_names import (
    AGENT_NAME,
    FILE_ENV,
    LIVEKIT_AGENTS,
    REPORT_ENV,
    SIDE_ENV,
)

PROBE_METHOD: Final = "callboard_probe_reverse"


class ReverseRunner(_InferenceRunner):
    """Reverses bytes and says which process did it."""

    INFERENCE_METHOD = PROBE_METHOD

    def initialize(self) -> None:
        self.pid = os.getpid()

    def run(self, data: bytes) -> bytes | None:
        return data[::-1] + b"|" + str(self.pid).encode()


_InferenceRunner.register_runner(ReverseRunner)


def load_example(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("receptionist", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["receptionist"] = module
    spec.loader.exec_module(module)
    return module


receptionist = load_example(os.environ[FILE_ENV])


def record(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields})
    with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def entrypoint(ctx: Any) -> None:
    inference = await ctx.inference_executor.do_inference(PROBE_METHOD, b"abc")
    session = http_context.http_session()
    record(
        "context",
        job_id=ctx.job.id,
        room=ctx.job.room.name,
        get_job_context=get_job_context() is ctx,
        http_session=type(session).__name__ if not session.closed else "closed",
        inference=(inference or b"").decode(),
    )
    await receptionist.entrypoint(ctx)
    observe(ctx.primary_session)

    async def on_shutdown(reason: str) -> None:
        record("shutdown", reason=reason)

    ctx.add_shutdown_callback(on_shutdown)


def observe(session: Any) -> None:
    record("started", agent_state=session.agent_state)
    session.on(
        "agent_state_changed",
        lambda ev: record("agent_state", old=ev.old_state, new=ev.new_state),
    )
    session.on(
        "user_input_transcribed",
        lambda ev: ev.is_final and record("transcript", text=ev.transcript),
    )
    session.on(
        "conversation_item_added",
        lambda ev: record("item", role=ev.item.role, text=ev.item.text_content),
    )
    session.on(
        "close",
        lambda ev: record(
            "close", reason=ev.reason.value, error=repr(ev.error) if ev.error else ""
        ),
    )


def prewarm(proc: Any) -> None:
    receptionist.prewarm(proc)


def no_load() -> float:
    """The machine is shared with the server and the caller: never report the worker full."""
    return 0.0


if __name__ == "__main__":
    if os.environ[SIDE_ENV] == LIVEKIT_AGENTS:
        from livekit.agents import WorkerOptions, cli
    else:
        from callboard import WorkerOptions, cli  # type: ignore[assignment]
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            prewarm_fnc=prewarm,
            agent_name=AGENT_NAME,
            load_fnc=no_load,
            load_threshold=math.inf,
            num_idle_processes=1,
            drain_timeout=1,
            host="127.0.0.1",
            port=0,
        )
    )
