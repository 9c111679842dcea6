"""An agent written for livekit-agents, ported by its one import (`from callboard import ...`),
run as `python livekit_agents_agent.py start` by tests/job/test_agents_bridge.py.

It records what livekit-agents code sees inside the job (the context variable, in the
entrypoint and in a task it starts; the HTTP session context; its inference executor serving a
runner registered the way livekit-agents' plugins register theirs; the shutdown reason) as JSON
lines in the file named by CALLBOARD_TEST_REPORT (tests/job/agents.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from livekit.agents import JobContext as AgentsJobContext
from livekit.agents import JobProcess as AgentsJobProcess
from livekit.agents import get_job_context
from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.utils import http_context

from callboard import JobContext, JobExecutorType, JobProcess, WorkerOptions, cli
from tests.job.agents import BRIDGE_EXECUTOR_ENV, BRIDGE_REPORT_ENV

INFERENCE_METHOD = "callboard_test_upper"


class UpperRunner(_InferenceRunner):
    """Upper-cases bytes and says which process did it."""

    INFERENCE_METHOD = INFERENCE_METHOD

    def initialize(self) -> None:
        self.pid = os.getpid()

    def run(self, data: bytes) -> bytes | None:
        return data.upper() + b"|" + str(self.pid).encode()


_InferenceRunner.register_runner(UpperRunner)


def report(event: str, **fields: Any) -> None:
    with open(os.environ[BRIDGE_REPORT_ENV], "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prewarmed_pid"] = os.getpid()


async def entrypoint(ctx: JobContext) -> None:
    async def seen_from_a_task() -> bool:
        return get_job_context() is ctx

    result = await ctx.inference_executor.do_inference(INFERENCE_METHOD, b"abc")
    session = http_context.http_session()

    async def on_shutdown(reason: str) -> None:
        report("shutdown", reason=reason, http_session_open=not http_context.http_session().closed)

    ctx.add_shutdown_callback(on_shutdown)
    report(
        "entry",
        livekit_context=isinstance(ctx, AgentsJobContext),
        livekit_process=isinstance(ctx.proc, AgentsJobProcess),
        prewarmed_here=ctx.proc.userdata.get("prewarmed_pid") == os.getpid(),
        get_job_context=get_job_context() is ctx,
        in_task=await asyncio.create_task(seen_from_a_task()),
        http_session_open=not session.closed,
        inference=(result or b"").decode(),
        job_id=ctx.job.id,
        room=ctx.room.name,
        token_identity=ctx.token_claims().identity,
        dev_mode=os.environ.get("LIVEKIT_DEV_MODE"),
        api_url=os.environ.get("LIVEKIT_URL"),
    )


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            prewarm_fnc=prewarm,
            job_executor_type=JobExecutorType(os.environ.get(BRIDGE_EXECUTOR_ENV, "process")),
            load_fnc=lambda: 0.0,
            num_idle_processes=1,
        )
    )
