"""WorkerOptions and its parts: one validated dataclass, dev/prod defaults, env resolution.

Field names follow livekit-agents' WorkerOptions. Values are checked at construction; the
connection settings (ws_url, api_key, api_secret) are resolved from LIVEKIT_* when the worker is
built (`resolve`), so a missing credential names the option and its variable.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar
from urllib.parse import urlparse

from livekit.protocol import agent, models

from callboard.job.context import JobContext, JobExecutorType, JobProcess, JobRequest
from callboard.worker.cost import JobCost

if TYPE_CHECKING:
    from callboard.worker.worker import Worker

T = TypeVar("T")

ENV_URL: Final = "LIVEKIT_URL"
ENV_API_KEY: Final = "LIVEKIT_API_KEY"
ENV_API_SECRET: Final = "LIVEKIT_API_SECRET"
ENV_AGENT_NAME: Final = "LIVEKIT_AGENT_NAME"

ASSIGNMENT_TIMEOUT_S: Final = 7.5
STATUS_INTERVAL_S: Final = 2.5
LOAD_SAMPLE_INTERVAL_S: Final = 0.5
LOAD_SAMPLES: Final = 5
DRAIN_TIMEOUT_S: Final = 1800.0
IDLE_PROCESSES_WINDOW_S: Final = 60.0
AVAILABILITY_ANSWER_TIMEOUT_S: Final = 5.0
"""How long request_fnc may take before the offer is rejected (the server waits 10 s)."""


MULTIPROCESSING_CONTEXTS: Final = ("forkserver", "spawn")


class OptionsError(ValueError):
    """An invalid worker option; the message names the option and how to fix it."""


class WorkerType(Enum):
    ROOM = agent.JT_ROOM
    PUBLISHER = agent.JT_PUBLISHER


@dataclass(frozen=True)
class EnvOption(Generic[T]):
    """A default that differs between `dev` and `start` (production)."""

    dev_default: T
    prod_default: T

    def get(self, devmode: bool) -> T:
        return self.dev_default if devmode else self.prod_default


def env_value(value: T | EnvOption[T], devmode: bool) -> T:
    return value.get(devmode) if isinstance(value, EnvOption) else value


@dataclass
class WorkerPermissions:
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_update_metadata: bool = True
    can_publish_sources: list[int] = field(default_factory=list)
    hidden: bool = False

    def to_proto(self) -> models.ParticipantPermission:
        return models.ParticipantPermission(
            can_publish=self.can_publish,
            can_subscribe=self.can_subscribe,
            can_publish_data=self.can_publish_data,
            can_update_metadata=self.can_update_metadata,
            can_publish_sources=self.can_publish_sources,  # type: ignore[arg-type]
            hidden=self.hidden,
            agent=True,
        )


async def _accept_all(req: JobRequest) -> None:
    await req.accept()


def _no_prewarm(proc: JobProcess) -> None:
    return None


def _default_idle_processes() -> int:
    return min(math.ceil(os.cpu_count() or 1), 4)


@dataclass
class WorkerOptions:
    """Everything a worker needs; see each field's docstring."""

    entrypoint_fnc: Callable[[JobContext], Awaitable[None]]
    """The agent: runs once per job, in its own process."""
    request_fnc: Callable[[JobRequest], Awaitable[None]] = _accept_all
    """Decides on each offer (accept/reject); the default accepts."""
    prewarm_fnc: Callable[[JobProcess], Any] = _no_prewarm
    """Runs once per process before it takes a job (load models into `proc.userdata`)."""
    load_fnc: Callable[[Worker], float] | Callable[[], float] | None = None
    """Current load in [0, 1]; None: the cgroup-aware CPU moving average."""
    job_executor_type: JobExecutorType = JobExecutorType.PROCESS
    """PROCESS (isolated, supervised) or THREAD (dev and tests)."""
    load_threshold: float | EnvOption[float] = field(
        default_factory=lambda: EnvOption(math.inf, 0.7)
    )
    """Share of the CPUs jobs may load: an offer is admitted only if one more job (at its
    learned cost) stays within it, and the worker reports FULL when none does; in (0, 1], or
    inf to disable (dev default)."""
    num_idle_processes: int | EnvOption[int] = field(
        default_factory=lambda: EnvOption(0, _default_idle_processes())
    )
    """Prewarmed processes kept ready for the next jobs (with `jobs_per_process` N > 1: enough
    for that many next jobs, counting the free places of processes already running jobs)."""
    permissions: WorkerPermissions = field(default_factory=WorkerPermissions)
    worker_type: WorkerType = WorkerType.ROOM
    agent_name: str | None = None
    """Explicit-dispatch name; empty means automatic dispatch. Default: LIVEKIT_AGENT_NAME."""
    ws_url: str | None = None
    """LiveKit server URL (ws://, wss://, http://, https://). Default: LIVEKIT_URL."""
    api_key: str | None = field(default=None, repr=False)
    """Default: LIVEKIT_API_KEY."""
    api_secret: str | None = field(default=None, repr=False)
    """Default: LIVEKIT_API_SECRET."""
    job_memory_warn_mb: float = 500.0
    """A job process above this memory (MB of USS, times the jobs it runs) is logged; 0
    disables."""
    job_memory_limit_mb: float = 0.0
    """A job process above this memory (MB of USS, times the jobs it runs) is killed and its
    jobs failed; 0 disables."""
    drain_timeout: float = DRAIN_TIMEOUT_S
    """Seconds a drain waits for running jobs before they are terminated."""
    host: str = ""
    """HTTP server address (health, readiness, metrics); empty means all interfaces."""
    port: int | EnvOption[int] = field(default_factory=lambda: EnvOption(0, 8081))
    """HTTP server port; 0 picks a free one."""
    http_proxy: str | None = None
    max_retry: int = 16
    """Reconnection attempts before the worker gives up, drains and exits non-zero."""
    initialize_process_timeout: float = 10.0
    shutdown_process_timeout: float = 10.0
    unresponsive_timeout: float = 30.0
    """A job process whose event loop does not answer pings this long is dumped and killed."""
    max_jobs: int = 0
    """Hard cap on concurrent jobs, independent of load; 0 means no cap (admission by cost,
    below, still applies)."""
    cpu_budget: float | None = None
    """CPUs the load is a share of. None: the cgroup's CPU quota, else the machine's CPUs,
    measured as a whole. When set, only this worker's own processes count against it (for
    several workers sharing one machine, or a test that must not see the machine's noise)."""
    initial_job_cost: JobCost = field(default_factory=JobCost)
    """What a job is assumed to cost (cores, MB of PSS) until running jobs have been measured;
    then the measured cost is learned. The default (0.25 core, 100 MB) is a voice call with
    the offline stack, rounded up (see callboard/worker/cost.py)."""
    memory_budget_mb: float | None = None
    """Total PSS the jobs may hold; an offer that would pass it is refused. None: 80% of the
    memory available when the worker starts (of the cgroup's limit, if any)."""
    idle_processes_memory_mb: float | EnvOption[float] = field(
        default_factory=lambda: EnvOption(256.0, 1024.0)
    )
    """Total PSS the prewarmed processes may hold (measured); 0 means no budget."""
    idle_processes_window: float = IDLE_PROCESSES_WINDOW_S
    """After a burst of N jobs the warm pool keeps up to N processes ready for this long (s),
    then shrinks back to num_idle_processes."""
    assignment_timeout: float = ASSIGNMENT_TIMEOUT_S
    """Seconds to wait for the server's assignment after accepting."""
    status_interval: float = STATUS_INTERVAL_S
    """Seconds between UpdateWorkerStatus messages (one is also sent on every change)."""
    availability_timeout: float = AVAILABILITY_ANSWER_TIMEOUT_S
    """Seconds request_fnc may take before the offer is rejected automatically."""
    namespace: str = ""
    jobs_per_process: int = 1
    """How many jobs one job process may run at once (PROCESS executor). 1: a process per job,
    so a crash, a blocked loop or a memory limit touches that job alone. N > 1 shares one
    process's memory (the rtc SDK's runtime, the interpreter, what prewarm loaded) among up to
    N calls, for fleets where memory per call matters more than that isolation. Per call it is
    about 30/N + 7 MB for a voice agent; N = 3-4 takes most of it (docs/ARCHITECTURE.md)."""
    multiprocessing_context: str = "forkserver"
    """How job processes start: "forkserver" (forked from the zygote, milliseconds) or "spawn"
    (a fresh interpreter each, for libraries that cannot survive a fork)."""

    def __post_init__(self) -> None:
        for name, what in (("entrypoint_fnc", "JobContext"), ("request_fnc", "JobRequest")):
            if not _is_async_callable(getattr(self, name)):
                raise OptionsError(f"{name} must be an async function taking a {what}")
        if not callable(self.prewarm_fnc):
            raise OptionsError("prewarm_fnc must be callable")
        if self.load_fnc is not None and not callable(self.load_fnc):
            raise OptionsError("load_fnc must be callable or None")
        for devmode in (True, False):
            threshold = env_value(self.load_threshold, devmode)
            if not _is_number(threshold) or not (threshold == math.inf or 0 < threshold <= 1):
                raise OptionsError(f"load_threshold must be in (0, 1] or inf, got {threshold!r}")
            idle = env_value(self.num_idle_processes, devmode)
            if not _is_int(idle) or idle < 0:
                raise OptionsError(f"num_idle_processes must be an int >= 0, got {idle!r}")
            idle_mb = env_value(self.idle_processes_memory_mb, devmode)
            if not _is_number(idle_mb) or not 0 <= idle_mb < math.inf:
                raise OptionsError(
                    "idle_processes_memory_mb must be a number >= 0 (0: no budget), "
                    f"got {idle_mb!r}"
                )
            port = env_value(self.port, devmode)
            if not _is_int(port) or not 0 <= port <= 65535:
                raise OptionsError(f"port must be in 0..65535, got {port!r}")
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise OptionsError(f"{name} must be a number > 0, got {value!r}")
        for name in ("job_memory_warn_mb", "job_memory_limit_mb"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0:
                raise OptionsError(f"{name} must be a number >= 0 (0 disables), got {value!r}")
        self._check_admission()
        for name in ("max_jobs", "max_retry"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise OptionsError(f"{name} must be an int >= 0, got {value!r}")
        if not _is_int(self.jobs_per_process) or self.jobs_per_process < 1:
            raise OptionsError(
                f"jobs_per_process must be an int >= 1, got {self.jobs_per_process!r}"
            )
        if self.multiprocessing_context not in MULTIPROCESSING_CONTEXTS:
            raise OptionsError(
                "multiprocessing_context must be one of "
                f"{', '.join(MULTIPROCESSING_CONTEXTS)}, got {self.multiprocessing_context!r}"
            )
        if not isinstance(self.job_executor_type, JobExecutorType):
            raise OptionsError("job_executor_type must be a JobExecutorType")
        if not isinstance(self.worker_type, WorkerType):
            raise OptionsError("worker_type must be a WorkerType (ROOM or PUBLISHER)")
        if self.ws_url is not None:
            _check_url(self.ws_url)

    def _check_admission(self) -> None:
        for name in ("cpu_budget", "memory_budget_mb"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value < math.inf):
                raise OptionsError(f"{name} must be a number > 0 or None, got {value!r}")
        cost = self.initial_job_cost
        if not isinstance(cost, JobCost):
            raise OptionsError(f"initial_job_cost must be a JobCost, got {cost!r}")
        for part in ("cpu", "memory_mb"):
            value = getattr(cost, part)
            if not _is_number(value) or not 0 < value < math.inf:
                raise OptionsError(f"initial_job_cost.{part} must be a number > 0, got {value!r}")

    def resolve(self, devmode: bool) -> ResolvedOptions:
        """Fill connection settings from the environment and pick dev/prod defaults."""
        ws_url = self.ws_url or os.environ.get(ENV_URL) or ""
        api_key = self.api_key or os.environ.get(ENV_API_KEY) or ""
        api_secret = self.api_secret or os.environ.get(ENV_API_SECRET) or ""
        agent_name = (
            self.agent_name if self.agent_name is not None else os.environ.get(ENV_AGENT_NAME, "")
        )
        missing = [
            f"{opt} (or set {env})"
            for opt, env, value in (
                ("ws_url", ENV_URL, ws_url),
                ("api_key", ENV_API_KEY, api_key),
                ("api_secret", ENV_API_SECRET, api_secret),
            )
            if not value
        ]
        if missing:
            raise OptionsError("missing " + ", ".join(missing))
        _check_url(ws_url)
        return ResolvedOptions(
            opts=replace(
                self, ws_url=ws_url, api_key=api_key, api_secret=api_secret, agent_name=agent_name
            ),
            devmode=devmode,
            load_threshold=env_value(self.load_threshold, devmode),
            num_idle_processes=env_value(self.num_idle_processes, devmode),
            idle_processes_memory_mb=env_value(self.idle_processes_memory_mb, devmode),
            port=env_value(self.port, devmode),
        )


@dataclass(frozen=True)
class ResolvedOptions:
    """WorkerOptions with every default picked for the mode and every credential present."""

    opts: WorkerOptions
    devmode: bool
    load_threshold: float
    num_idle_processes: int
    idle_processes_memory_mb: float
    port: int

    @property
    def ws_url(self) -> str:
        return self.opts.ws_url or ""

    @property
    def api_key(self) -> str:
        return self.opts.api_key or ""

    @property
    def api_secret(self) -> str:
        return self.opts.api_secret or ""

    @property
    def agent_name(self) -> str:
        return self.opts.agent_name or ""


_POSITIVE_SECONDS: Final = (
    "drain_timeout",
    "initialize_process_timeout",
    "shutdown_process_timeout",
    "assignment_timeout",
    "status_interval",
    "availability_timeout",
    "unresponsive_timeout",
    "idle_processes_window",
)


def _is_number(value: object) -> bool:
    """An int or float, not a bool (True is not a timeout) and not NaN."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_async_callable(fn: object) -> bool:
    """An `async def` function, a partial of one, or an object with an async __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (callable() would accept sync functions)
    )


def _check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("ws", "wss", "http", "https") or not parsed.netloc:
        raise OptionsError(
            f"ws_url must look like ws://host:port or wss://host, got {url!r} "
            f"(option ws_url or {ENV_URL})"
        )
