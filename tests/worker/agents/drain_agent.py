"""A real agent script, run as `python drain_agent.py start` by the worker's CLI tests.

Its entrypoint lives in `__main__`, as in a user's agent: each job runs for the number of
seconds in the job's metadata (default 2), then returns. Configuration comes from the
environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, LIVEKIT_AGENT_NAME,
CALLBOARD_TEST_HTTP_PORT for the worker's HTTP server, CALLBOARD_TEST_JOB_S for the default
job length, and CALLBOARD_TEST_REJECT=1 to refuse every job.
"""

from __future__ import annotations

import asyncio
import os

from callboard import JobContext, JobRequest, WorkerOptions, cli

HTTP_PORT_ENV = "CALLBOARD_TEST_HTTP_PORT"
JOB_S_ENV = "CALLBOARD_TEST_JOB_S"
REJECT_ENV = "CALLBOARD_TEST_REJECT"


async def entrypoint(ctx: JobContext) -> None:
    await asyncio.sleep(float(ctx.job.metadata or os.environ.get(JOB_S_ENV, "2")))


async def request_fnc(req: JobRequest) -> None:
    if os.environ.get(REJECT_ENV) == "1":
        await req.reject()
    else:
        await req.accept()


def no_load() -> float:
    return 0.0


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(
            entrypoint_fnc=entrypoint,
            request_fnc=request_fnc,
            load_fnc=no_load,
            host="127.0.0.1",
            port=int(os.environ.get(HTTP_PORT_ENV, "0")),
            num_idle_processes=3,
            status_interval=0.5,
            drain_timeout=20.0,
            shutdown_process_timeout=2.0,
        )
    )
