"""The job executor a worker's options ask for: threads, or zygote-forked processes.

The job engine takes plain values (a ZygoteConfig, SupervisionLimits, a pool size); this module
turns the worker's options into them, so the engine never sees the worker's option types.
"""

from __future__ import annotations

import logging
import sys

from callboard.job import ipc
from callboard.job.context import JobExecutorType
from callboard.job.executor import JobExecutor
from callboard.job.process import SupervisionLimits
from callboard.job.thread import ThreadExecutor
from callboard.job.zygote import START_FORK, START_SPAWN
from callboard.worker.options import ResolvedOptions


def build_executor(r: ResolvedOptions) -> JobExecutor:
    o = r.opts
    if o.job_executor_type == JobExecutorType.THREAD:
        return ThreadExecutor(o.entrypoint_fnc, o.prewarm_fnc, o.shutdown_process_timeout)
    from callboard.job.pool import ProcessExecutor, function_ref

    config = ipc.ZygoteConfig(
        entrypoint=function_ref(o.entrypoint_fnc),
        prewarm=function_ref(o.prewarm_fnc),
        preload=(),
        sys_path=tuple(sys.path),
        log_level=logging.getLogger().getEffectiveLevel(),
        shutdown_timeout=o.shutdown_process_timeout,
        start_method=START_SPAWN if o.multiprocessing_context == "spawn" else START_FORK,
        env=job_env(r),
    )
    limits = SupervisionLimits(
        memory_warn_mb=o.job_memory_warn_mb,
        memory_limit_mb=o.job_memory_limit_mb,
        initialize_timeout=o.initialize_process_timeout,
        shutdown_timeout=o.shutdown_process_timeout,
        unresponsive_timeout=o.unresponsive_timeout,
    )
    return ProcessExecutor(
        config, limits, r.num_idle_processes, r.idle_processes_memory_mb, o.jobs_per_process
    )


def job_env(r: ResolvedOptions) -> tuple[tuple[str, str], ...]:
    """The server and credentials as LIVEKIT_* for the job processes, as livekit-agents exports
    them: `ctx.api` and plugins read them from the environment."""
    return (
        ("LIVEKIT_URL", r.ws_url),
        ("LIVEKIT_API_KEY", r.api_key),
        ("LIVEKIT_API_SECRET", r.api_secret),
    )
