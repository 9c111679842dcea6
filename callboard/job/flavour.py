"""Which JobContext a job gets: livekit-agents' own (through callboard/job/agents_bridge.py)
when the agent imported livekit.agents, callboard's otherwise.

Decided per process from what is already imported, never by importing: an agent that does not
use livekit-agents pays nothing for it, and one that does gets the context its AgentSession,
room IO and plugins expect.
"""

from __future__ import annotations

import sys
from typing import Any, Final

from callboard.job.context import JobContext, JobExecutorType, JobProcess, RunningJobInfo
from callboard.job.runner import RunnableJob

AGENTS_MODULE: Final = "livekit.agents"


def uses_livekit_agents() -> bool:
    """True once the agent (or a preload) has imported livekit.agents."""
    return AGENTS_MODULE in sys.modules


def new_job_process(executor_type: JobExecutorType) -> Any:
    """The JobProcess handed to prewarm_fnc and kept as `ctx.proc`."""
    if uses_livekit_agents():
        from callboard.job import agents_bridge

        return agents_bridge.new_job_process(executor_type)
    return JobProcess(executor_type=executor_type)


def new_job_context(proc: Any, info: RunningJobInfo, inference: Any | None) -> RunnableJob:
    """The context of one job, of the flavour the agent uses."""
    if uses_livekit_agents():
        from callboard.job.agents_bridge import AgentsJobContext

        return AgentsJobContext(proc=proc, info=info, inference_executor=inference)
    return JobContext(proc=proc, info=info, inference_executor=inference)
