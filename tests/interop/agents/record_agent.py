"""A real livekit-agents worker for the interop tests: it records each job it is given, and the
job's end, as JSON lines appended to the file named by CALLBOARD_INTEROP_RECORD.

    CALLBOARD_INTEROP_RECORD=jobs.jsonl CALLBOARD_INTEROP_AGENT_NAME=my-agent \\
    LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
    python record_agent.py start

Events: `registered` (worker id, from the worker process), `job` (from the job process: job id,
dispatch id, room, agent name, metadata), `shutdown` (the job's shutdown callback, with its
reason). The entrypoint does not call `ctx.connect()` (callboard server has no /rtc yet); it
records the job and returns, which leaves the job running until the server terminates it.
It does not wait on an event set by a shutdown callback: livekit-agents runs shutdown callbacks
only after the entrypoint has returned (or after 15 s, by cancelling it).

An empty or unset CALLBOARD_INTEROP_AGENT_NAME registers for automatic dispatch; a name enables
explicit dispatch only (livekit-agents' rule).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from livekit.agents import AgentServer, JobContext, WorkerOptions, cli
from livekit.protocol import models

RECORD_ENV = "CALLBOARD_INTEROP_RECORD"
AGENT_NAME_ENV = "CALLBOARD_INTEROP_AGENT_NAME"
# On SIGTERM, wait this long for running jobs (which run until terminated) before closing them.
DRAIN_TIMEOUT_S = 1


def record(event: str, **fields: Any) -> None:
    """Append one JSON line (one write, O_APPEND: lines from several processes do not mix)."""
    line = json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields})
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def entrypoint(ctx: JobContext) -> None:
    job = ctx.job
    record(
        "job",
        job_id=job.id,
        dispatch_id=job.dispatch_id,
        room=job.room.name,
        room_sid=job.room.sid,
        agent_name=job.agent_name,
        metadata=job.metadata,
    )

    async def on_shutdown(reason: str) -> None:
        record("shutdown", job_id=job.id, room=job.room.name, reason=reason)

    ctx.add_shutdown_callback(on_shutdown)


def no_load() -> float:
    """The machine's CPU is shared with the servers and the tests: never report the worker full."""
    return 0.0


def on_registered(worker_id: str, server_info: models.ServerInfo) -> None:
    record(
        "registered",
        worker_id=worker_id,
        agent_name=os.environ.get(AGENT_NAME_ENV, ""),
        server_version=server_info.version,
    )


def main() -> None:
    options = WorkerOptions(
        entrypoint_fnc=entrypoint,
        agent_name=os.environ.get(AGENT_NAME_ENV, ""),
        load_fnc=no_load,
        load_threshold=math.inf,
        num_idle_processes=1,
        drain_timeout=DRAIN_TIMEOUT_S,
        host="127.0.0.1",
        port=0,
    )
    server = AgentServer.from_server_options(options)
    server.on("worker_registered", on_registered)
    cli.run_app(server)


if __name__ == "__main__":
    main()
