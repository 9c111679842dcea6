"""The voice benchmark agent, callboard side (`theirs_voice_agent.py` differs only in its
import): examples/receptionist.py, loaded from BENCH_EXAMPLE (the example itself, or its copy
with the one import changed back to livekit-agents'), with its entrypoint's start recorded.

    BENCH_RECORD=jobs.jsonl BENCH_AGENT_NAME=voice BENCH_EXAMPLE=examples/receptionist.py \\
    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... python ours_voice_agent.py start

The entrypoint appends `{"job_id", "room", "time": time.time(), "pid"}` to BENCH_RECORD as its
first act, then runs the receptionist's entrypoint (an AgentSession that joins the room and
greets). Each side keeps its own production defaults but for the load: the worker reports 0
and never refuses for load (the machine is shared; BENCH_DEFAULT_LOAD=1 keeps the defaults),
and a drain waits at most 1 s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from types import ModuleType
from typing import Any

from callboard import JobContext, WorkerOptions, cli


def load_example(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("receptionist", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["receptionist"] = module
    spec.loader.exec_module(module)
    return module


receptionist = load_example(os.environ["BENCH_EXAMPLE"])


def prewarm(proc: Any) -> None:
    receptionist.prewarm(proc)


async def entrypoint(ctx: JobContext) -> None:
    line = json.dumps(
        {"job_id": ctx.job.id, "room": ctx.job.room.name, "time": time.time(), "pid": os.getpid()}
    )
    fd = os.open(os.environ["BENCH_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    await receptionist.entrypoint(ctx)


def no_load() -> float:
    return 0.0


def load_options() -> dict[str, Any]:
    """Never refuse for load, unless BENCH_DEFAULT_LOAD=1 keeps the worker's own defaults
    (bench/admission.py; BENCH_CPU_BUDGET=N then counts only the worker's own processes)."""
    if os.environ.get("BENCH_DEFAULT_LOAD"):
        budget = os.environ.get("BENCH_CPU_BUDGET")
        return {"cpu_budget": float(budget)} if budget else {}
    return {"load_fnc": no_load, "load_threshold": math.inf}


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            prewarm_fnc=prewarm,
            agent_name=os.environ["BENCH_AGENT_NAME"],
            **load_options(),
            drain_timeout=1,
            host="127.0.0.1",
            port=0,
        )
    )
