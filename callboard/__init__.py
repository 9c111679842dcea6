"""callboard: fast, sturdy LiveKit voice-agent workers and an embedded LiveKit-compatible server.

The public API mirrors livekit-agents: `from callboard import Worker, WorkerOptions, cli, ...`.
"""

from callboard import cli
from callboard.job.context import (
    AutoSubscribe,
    JobContext,
    JobExecutorType,
    JobProcess,
    JobRequest,
)
from callboard.version import __version__
from callboard.worker.options import EnvOption, WorkerOptions, WorkerPermissions, WorkerType
from callboard.worker.worker import Worker

__all__ = [
    "AutoSubscribe",
    "EnvOption",
    "JobContext",
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
