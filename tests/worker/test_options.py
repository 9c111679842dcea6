"""WorkerOptions: every invalid value is refused at construction (or at resolution, for what
the environment supplies) with a message that names the option and, where one exists, its
environment variable.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import pytest

from callboard import EnvOption, JobContext, JobCost, WorkerOptions
from callboard.worker.options import (
    ENV_AGENT_NAME,
    ENV_API_KEY,
    ENV_API_SECRET,
    ENV_URL,
    OptionsError,
)


async def entrypoint(ctx: JobContext) -> None:
    return None


def options(**overrides: Any) -> WorkerOptions:
    return WorkerOptions(entrypoint_fnc=overrides.pop("entrypoint_fnc", entrypoint), **overrides)


@pytest.fixture(autouse=True)
def no_livekit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_URL, ENV_API_KEY, ENV_API_SECRET, ENV_AGENT_NAME):
        monkeypatch.delenv(name, raising=False)


CONNECTION = {"ws_url": "ws://127.0.0.1:7880", "api_key": "k", "api_secret": "s"}


@pytest.mark.parametrize(
    ("missing", "env"),
    [("ws_url", ENV_URL), ("api_key", ENV_API_KEY), ("api_secret", ENV_API_SECRET)],
)
def test_missing_connection_setting_names_the_option_and_its_variable(
    missing: str, env: str
) -> None:
    given = {k: v for k, v in CONNECTION.items() if k != missing}
    with pytest.raises(OptionsError, match=re.escape(f"missing {missing} (or set {env})")):
        options(**given).resolve(devmode=False)


def test_all_missing_are_named_in_one_message() -> None:
    with pytest.raises(OptionsError) as err:
        options().resolve(devmode=True)
    assert str(err.value) == (
        "missing ws_url (or set LIVEKIT_URL), api_key (or set LIVEKIT_API_KEY), "
        "api_secret (or set LIVEKIT_API_SECRET)"
    )


def test_environment_fills_what_the_options_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, "wss://example.livekit.cloud")
    monkeypatch.setenv(ENV_API_KEY, "env-key")
    monkeypatch.setenv(ENV_API_SECRET, "env-secret")
    monkeypatch.setenv(ENV_AGENT_NAME, "env-agent")
    r = options().resolve(devmode=False)
    assert (r.ws_url, r.api_key, r.api_secret, r.agent_name) == (
        "wss://example.livekit.cloud",
        "env-key",
        "env-secret",
        "env-agent",
    )
    explicit = options(**CONNECTION, agent_name="").resolve(devmode=False)
    assert (explicit.ws_url, explicit.api_key, explicit.agent_name) == (
        "ws://127.0.0.1:7880",
        "k",
        "",
    ), "explicit options win over the environment; agent_name='' stays automatic"


def test_dev_and_production_defaults() -> None:
    dev = options(**CONNECTION).resolve(devmode=True)
    prod = options(**CONNECTION).resolve(devmode=False)
    assert math.isinf(dev.load_threshold) and prod.load_threshold == 0.7
    assert dev.num_idle_processes == 0 and prod.num_idle_processes >= 1
    assert dev.port == 0 and prod.port == 8081
    assert dev.idle_processes_memory_mb == 256 and prod.idle_processes_memory_mb == 1024
    assert prod.opts.initial_job_cost == JobCost(cpu=0.25, memory_mb=100.0)
    assert prod.opts.cpu_budget is None and prod.opts.memory_budget_mb is None


@pytest.mark.parametrize("url", ["localhost:7880", "ftp://host", "ws://", "127.0.0.1", ""])
def test_bad_url_is_refused(url: str) -> None:
    if url:
        with pytest.raises(OptionsError, match=r"ws_url must look like ws://host:port") as err:
            options(ws_url=url)
        assert ENV_URL in str(err.value)
    with pytest.raises(OptionsError, match="ws_url"):
        options(api_key="k", api_secret="s", ws_url=url or None).resolve(devmode=False)


def test_bad_url_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, "localhost:7880")
    with pytest.raises(OptionsError, match=f"ws_url must look like.*{ENV_URL}"):
        options(api_key="k", api_secret="s").resolve(devmode=False)


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:7880", "wss://x.livekit.cloud", "http://h:1", "https://h/"]
)
def test_good_urls(url: str) -> None:
    options(ws_url=url)


@pytest.mark.parametrize(
    "value", [0, -0.1, 1.01, 7, math.nan, -math.inf, EnvOption(math.inf, 1.5), "0.5"]
)
def test_load_threshold_outside_0_1(value: Any) -> None:
    with pytest.raises(OptionsError, match=r"load_threshold must be in \(0, 1\] or inf"):
        options(load_threshold=value)


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-3, math.inf, EnvOption(math.inf, 0.9)])
def test_load_threshold_accepted(value: Any) -> None:
    options(load_threshold=value)


@pytest.mark.parametrize("value", [-1, EnvOption(0, -2), 1.5, "2", True])
def test_num_idle_processes_must_be_a_non_negative_int(value: Any) -> None:
    with pytest.raises(OptionsError, match="num_idle_processes must be an int >= 0"):
        options(num_idle_processes=value)


@pytest.mark.parametrize("value", [-1, 65536, 70000, "8081", 80.5, True, EnvOption(0, -5)])
def test_bad_port(value: Any) -> None:
    with pytest.raises(OptionsError, match=r"port must be in 0\.\.65535"):
        options(port=value)


TIMEOUTS = [
    "drain_timeout",
    "initialize_process_timeout",
    "shutdown_process_timeout",
    "assignment_timeout",
    "status_interval",
    "availability_timeout",
    "unresponsive_timeout",
    "idle_processes_window",
]


@pytest.mark.parametrize("name", TIMEOUTS)
@pytest.mark.parametrize("value", [0, -1.0, math.nan, "5", None])
def test_timeouts_must_be_positive_numbers(name: str, value: Any) -> None:
    with pytest.raises(OptionsError, match=f"^{name} must be a number > 0, got"):
        options(**{name: value})


@pytest.mark.parametrize("name", ["max_jobs", "max_retry"])
@pytest.mark.parametrize("value", [-1, 2.5, "3", None])
def test_counts_must_be_non_negative_ints(name: str, value: Any) -> None:
    with pytest.raises(OptionsError, match=f"^{name} must be an int >= 0, got"):
        options(**{name: value})


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", None, True])
def test_jobs_per_process_is_an_int_of_at_least_one(value: Any) -> None:
    with pytest.raises(OptionsError, match=r"^jobs_per_process must be an int >= 1, got"):
        options(jobs_per_process=value)


@pytest.mark.parametrize("name", ["job_memory_warn_mb", "job_memory_limit_mb"])
@pytest.mark.parametrize("value", [-1, -0.5, math.nan, "100"])
def test_memory_limits_must_be_non_negative_numbers(name: str, value: Any) -> None:
    with pytest.raises(OptionsError, match=f"^{name} must be a number >= 0"):
        options(**{name: value})


@pytest.mark.parametrize("name", ["cpu_budget", "memory_budget_mb"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "2", True])
def test_budgets_must_be_positive_numbers_or_none(name: str, value: Any) -> None:
    with pytest.raises(OptionsError, match=f"^{name} must be a number > 0 or None, got"):
        options(**{name: value})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.25, "initial_job_cost must be a JobCost"),
        (JobCost(cpu=0.0), r"initial_job_cost\.cpu must be a number > 0"),
        (JobCost(memory_mb=-5.0), r"initial_job_cost\.memory_mb must be a number > 0"),
        (JobCost(cpu=math.nan), r"initial_job_cost\.cpu must be a number > 0"),
    ],
)
def test_initial_job_cost_must_be_a_positive_job_cost(value: Any, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        options(initial_job_cost=value)


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "64", EnvOption(0.0, -1.0)])
def test_idle_processes_memory_must_be_a_non_negative_number(value: Any) -> None:
    with pytest.raises(OptionsError, match="idle_processes_memory_mb must be a number >= 0"):
        options(idle_processes_memory_mb=value)


def test_budgets_accepted() -> None:
    opts = options(
        cpu_budget=1.5,
        memory_budget_mb=2048,
        initial_job_cost=JobCost(cpu=0.1, memory_mb=60.0),
        idle_processes_memory_mb=0,
    )
    assert opts.cpu_budget == 1.5


def test_zero_means_no_cap_and_no_memory_limit() -> None:
    opts = options(max_jobs=0, max_retry=0, job_memory_warn_mb=0, job_memory_limit_mb=0)
    assert opts.max_jobs == 0


@pytest.mark.parametrize("value", [None, "my_module.entrypoint", 42])
def test_entrypoint_must_be_callable(value: Any) -> None:
    with pytest.raises(OptionsError, match="entrypoint_fnc must be an async function"):
        options(entrypoint_fnc=value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("request_fnc", "request_fnc must be an async function"),
        ("prewarm_fnc", "prewarm_fnc must be callable"),
        ("load_fnc", "load_fnc must be callable"),
    ],
)
def test_hooks_must_be_callable(name: str, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        options(**{name: "not callable"})


def test_executor_and_worker_type_must_be_their_enums() -> None:
    with pytest.raises(OptionsError, match="job_executor_type must be a JobExecutorType"):
        options(job_executor_type="process")
    with pytest.raises(OptionsError, match="worker_type must be a WorkerType"):
        options(worker_type="room")


def test_options_error_is_a_value_error() -> None:
    assert issubclass(OptionsError, ValueError)


def test_entrypoint_and_request_fnc_must_be_async() -> None:
    def sync_entry(ctx: object) -> None:
        return None

    async def async_entry(ctx: object, extra: int) -> None:
        return None

    with pytest.raises(OptionsError, match="entrypoint_fnc must be an async function"):
        WorkerOptions(entrypoint_fnc=sync_entry)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="request_fnc must be an async function"):
        WorkerOptions(
            entrypoint_fnc=functools.partial(async_entry, extra=1),
            request_fnc=print,  # type: ignore[arg-type]
        )
