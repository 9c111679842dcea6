"""Call script: jobs that end themselves after joining their room (`ctx.shutdown()`, as an
end-call tool does), run by callboard's worker against one server kind in a private network
namespace; reports how the server recorded each job's end.

    python -m tests.interop.self_ending_call WORKDIR [callboard|livekit-server]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Final

from livekit import api

from callboard.log import setup_logging
from tests.interop.agents import callboard_agents
from tests.interop.call_process import against_server, call_script_main
from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess
from tests.interop.media_call import running_worker, server_job_ended
from tests.interop.support import wait_until

JOBS: Final = 3
JOB_TIMEOUT_S: Final = 20.0
CALL_TIMEOUT_S: Final = 90.0


async def job_id(lk: api.LiveKitAPI, room: str) -> str | None:
    for dispatch in await lk.agent_dispatch.list_dispatch(room):
        for job in dispatch.state.jobs:
            return job.id
    return None


async def call(server: ServerProcess, report: dict[str, Any]) -> None:
    recorded: list[dict[str, Any]] = []
    report["recorded"] = recorded
    async with (
        api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk,
        running_worker(server, callboard_agents.hangs_up_itself) as worker,
    ):
        for n in range(JOBS):
            room = f"call-self-ending-{n}"
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            job = await wait_until(lambda r=room: job_id(lk, r), "the job", JOB_TIMEOUT_S)
            end = await wait_until(
                lambda j=job: server_job_ended(server, j), "the server's end", JOB_TIMEOUT_S
            )
            await wait_until(lambda: not worker.active_jobs, "the job to close", JOB_TIMEOUT_S)
            recorded.append({"job_id": job, "status": end["status"], "error": end["error"]})


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    kind = argv[2] if len(argv) > 2 else "livekit-server"
    report: dict[str, Any] = {"kind": kind}

    def run() -> None:
        setup_logging("json", logging.INFO)

        async def main_call(server: ServerProcess) -> None:
            await call(server, report)

        against_server(kind, workdir, report, main_call, CALL_TIMEOUT_S)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
