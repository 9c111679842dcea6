"""callboard: fast, sturdy LiveKit voice-agent workers and an embedded LiveKit-compatible server.

The public API mirrors livekit-agents: `from callboard import Worker, WorkerOptions, cli, ...`.
Names are imported on first use, so a job process or the zygote that imports one submodule
does not pay for the worker's networking stack or the embedded server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from callboard.version import __version__

if TYPE_CHECKING:
    from callboard import cli
    from callboard.job.context import (
        AutoSubscribe,
        JobContext,
        JobExecutorType,
        JobProcess,
        JobRequest,
    )
    from callboard.worker.cost import JobCost
    from callboard.worker.options import EnvOption, WorkerOptions, WorkerPermissions, WorkerType
    from callboard.worker.worker import Worker

_EXPORTS = {
    "AutoSubscribe": "callboard.job.context",
    "JobContext": "callboard.job.context",
    "JobExecutorType": "callboard.job.context",
    "JobProcess": "callboard.job.context",
    "JobRequest": "callboard.job.context",
    "EnvOption": "callboard.worker.options",
    "JobCost": "callboard.worker.cost",
    "WorkerOptions": "callboard.worker.options",
    "WorkerPermissions": "callboard.worker.options",
    "WorkerType": "callboard.worker.options",
    "Worker": "callboard.worker.worker",
}

__all__ = [
    "AutoSubscribe",
    "EnvOption",
    "JobContext",
    "JobCost",
    "JobExecutorType",
    "JobProcess",
    "JobRequest",
    "Worker",
    "WorkerOptions",
    "WorkerPermissions",
    "WorkerType",
    "__version__",
    "cli",
]


def __getattr__(name: str) -> Any:
    if name == "cli":
        return importlib.import_module("callboard.cli")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'callboard' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
