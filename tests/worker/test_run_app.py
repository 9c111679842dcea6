"""`cli.run_app(opts)`: a real agent script under SIGTERM (drain, exit 0), and the exit codes
and one-line errors of `python agent.py start` with bad options or an unreachable server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
import pytest
from livekit import api
from livekit.protocol import agent

from callboard.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, app_main
from callboard.log import root_logging_kept
from callboard.server.app import EmbeddedServer, run_server
from callboard.server.config import ServerConfig
from callboard.simworker import SimWorker
from callboard.worker.options import ENV_AGENT_NAME, ENV_API_KEY, ENV_API_SECRET, ENV_URL
from tests.worker.agents import jobs
from tests.worker.support import (
    DEADLINE_S,
    LeakedChildProcesses,
    control,
    describe,
    wait_until,
)

SCRIPT: Final = Path(__file__).parent / "agents" / "drain_agent.py"
KEY: Final = "key1"
SECRET: Final = "k7Qp2Zr9Lm4Xv8Bn1Hs6Td3Wy5Fc0Ga9Je2Uo7R"
AGENT: Final = "drainer"
JOB_S: Final = 2.0
STARTUP_DEADLINE_S: Final = 20.0
EXIT_DEADLINE_S: Final = 15.0


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """`app_main` installs its log handler on the root logger; put the test's logging back."""
    with root_logging_kept():
        yield


@pytest.fixture
def no_livekit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_URL, ENV_API_KEY, ENV_API_SECRET, ENV_AGENT_NAME):
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- invalid options and unreachable servers -----------------------------------------------


JPP0 = ("--jobs-per-process", "0")


@pytest.mark.usefixtures("no_livekit_env")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["start"],
            "missing ws_url (or set LIVEKIT_URL), api_key (or set LIVEKIT_API_KEY), "
            "api_secret (or set LIVEKIT_API_SECRET)",
        ),
        (
            ["start", "--url", "ws://127.0.0.1:7880", "--api-key", "k"],
            "missing api_secret (or set LIVEKIT_API_SECRET)",
        ),
        (
            ["dev", "--url", "localhost:7880", "--api-key", "k", "--api-secret", "s"],
            "ws_url must look like ws://host:port or wss://host, got 'localhost:7880'",
        ),
        (
            ["start", "--url", "ws://127.0.0.1:7880", "--api-key", "k", "--api-secret", "s", *JPP0],
            "jobs_per_process must be an int >= 1, got 0",
        ),
    ],
    ids=["nothing", "no-secret", "bad-url", "jobs-per-process"],
)
def test_bad_options_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    opts = jobs_options()
    assert app_main(opts, argv) == EXIT_USAGE
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("callboard: error: invalid worker options: ")
    assert expected in line
    assert captured.out == ""


def test_env_provides_the_connection_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LIVEKIT_* fill what the options leave out; a bad LIVEKIT_URL names the variable."""
    monkeypatch.setenv(ENV_URL, "http//oops")
    monkeypatch.setenv(ENV_API_KEY, "k")
    monkeypatch.setenv(ENV_API_SECRET, "s")
    assert app_main(jobs_options(), ["start"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert "ws_url must look like" in line and "LIVEKIT_URL" in line


def test_unreachable_server_exits_1_after_max_retry(
    no_livekit_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = jobs_options(max_retry=0, port=0)
    argv = ["start", "--url", f"ws://127.0.0.1:{free_port()}", "--api-key", "k"]
    assert app_main(opts, [*argv, "--api-secret", "s"]) == EXIT_FAILURE
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("callb")]
    (line,) = err_lines
    assert line.startswith("callboard: error: could not reach ws://127.0.0.1:")


def jobs_options(**overrides: Any) -> Any:
    from callboard import WorkerOptions

    values: dict[str, Any] = {"entrypoint_fnc": jobs.scripted, "load_fnc": lambda: 0.0}
    values.update(overrides)
    return WorkerOptions(**values)


async def test_agent_script_without_credentials_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "start",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), EXIT_DEADLINE_S)
    assert proc.returncode == EXIT_USAGE
    (line,) = err.decode().splitlines()
    assert line == (
        "callboard: error: invalid worker options: missing ws_url (or set LIVEKIT_URL), "
        "api_key (or set LIVEKIT_API_KEY), api_secret (or set LIVEKIT_API_SECRET)"
    )


# -- SIGTERM: drain three running jobs, exit 0 -----------------------------------------------


class AgentProcess:
    """`python drain_agent.py start` with its stderr (JSON log lines) collected."""

    def __init__(self, proc: asyncio.subprocess.Process, http_port: int) -> None:
        self.proc = proc
        self.http_port = http_port
        self.stderr: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, str]:
        async with http.get(f"http://127.0.0.1:{self.http_port}{path}") as resp:
            return resp.status, await resp.text()

    async def poll_info(
        self, http: aiohttp.ClientSession, until: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """GET /worker until `until(json)` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while True:
            status, body = await self.get(http, "/worker")
            assert status == 200, body
            info: dict[str, Any] = json.loads(body)
            if until(info):
                return info
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {info}")
            await asyncio.sleep(0.05)

    async def wait_exit(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), EXIT_DEADLINE_S)
        await asyncio.wait_for(self._reader, EXIT_DEADLINE_S)
        return code


@contextlib.asynccontextmanager
async def agent_process(
    server: EmbeddedServer, *argv: str, **env_extra: str
) -> AsyncIterator[AgentProcess]:
    port = free_port()
    env = {
        **os.environ,
        ENV_URL: server.url,
        ENV_API_KEY: KEY,
        ENV_API_SECRET: SECRET,
        ENV_AGENT_NAME: AGENT,
        "CALLBOARD_TEST_HTTP_PORT": str(port),
        **env_extra,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *(argv or ("start",)),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    agent_proc = AgentProcess(proc, port)
    try:
        yield agent_proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


async def warn_if_alive(pids: set[int], timeout: float = 5.0) -> None:
    """SOFT CHECK (a warning, not a failure): the job engine's processes must not outlive
    the worker process."""

    def alive() -> set[int]:
        out = set()
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.add(pid)
        return out

    with contextlib.suppress(AssertionError):
        await wait_until(lambda: not alive(), "the job processes to exit", timeout)
    if left := alive():
        warnings.warn(
            LeakedChildProcesses(f"outlived the worker process: {describe(left)}"), stacklevel=2
        )
        for pid in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


async def test_sigterm_with_three_running_jobs_drains_them_and_exits_0() -> None:
    async with (
        run_server(ServerConfig(port=0, keys={KEY: SECRET})) as server,
        control(server, KEY, SECRET) as ctl,
        aiohttp.ClientSession() as http,
        agent_process(server) as worker,
    ):

        def session() -> Any:
            found = [s for s in server.engine.workers if s.agent_name == AGENT]
            return found[0] if found else None

        await wait_until(lambda: session() is not None, "the agent to register", STARTUP_DEADLINE_S)
        await wait_until(
            lambda: session().status == agent.WS_AVAILABLE and session().load < 1.0,
            "the agent to be available",
        )
        assert await worker.get(http, "/ready") == (200, "ready")

        rooms = [f"call-{i}" for i in range(3)]
        for room in rooms:
            await ctl.dispatch(room, AGENT, str(JOB_S))
        for room in rooms:
            await ctl.wait_status(room, agent.JS_RUNNING, agent_name=AGENT)
        info = await worker.poll_info(http, lambda i: len(i["jobs"]) == 3, "3 running jobs")
        assert all(j["pid"] for j in info["jobs"])
        job_pids = descendants(worker.proc.pid)

        worker.proc.send_signal(signal.SIGTERM)
        s = session()
        await wait_until(lambda: s.draining, "the server to see the drain", 1.0)
        assert s.status == agent.WS_FULL
        assert await worker.get(http, "/ready") == (503, "draining")
        assert (await worker.get(http, "/"))[0] == 200

        # new dispatches are refused while the three jobs finish
        await ctl.dispatch("too-late", AGENT, "0.1")
        late = await ctl.wait_status("too-late", agent.JS_FAILED, agent_name=AGENT)
        assert late.state.reason == agent.JSR_NO_CAPACITY and late.state.error
        assert worker.proc.returncode is None, "the worker waits for its jobs"
        # ... or go to another worker when there is one
        other = SimWorker(server.url, KEY, SECRET, agent_name=AGENT, job_seconds=0.0)
        await other.start()
        try:
            await ctl.dispatch("elsewhere", AGENT, "0.1")
            moved = await ctl.wait_status("elsewhere", agent.JS_SUCCESS, agent_name=AGENT)
            assert moved.state.worker_id == other.worker_id
        finally:
            await other.aclose()
        for room in rooms:
            done = await ctl.wait_status(room, agent.JS_SUCCESS, agent_name=AGENT, timeout=10.0)
            assert done.state.error == ""
            assert done.state.ended_at - done.state.started_at >= JOB_S * 1e9 * 0.9

        assert await worker.wait_exit() == EXIT_OK
        await warn_if_alive(job_pids)

    logs = worker.logs()
    messages = [rec.get("message") for rec in logs]
    assert "signal received" in messages and "draining worker" in messages
    (drain,) = [rec for rec in logs if rec.get("message") == "draining worker"]
    assert drain["worker_id"].startswith("AW_")
    output = "\n".join(worker.stderr)
    assert SECRET not in output
    assert "eyJ" not in output, "no token may reach the logs"


def test_http_port_in_use_exits_1_with_one_line(
    no_livekit_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        opts = jobs_options(port=port, host="127.0.0.1")
        argv = ["start", "--url", "ws://127.0.0.1:9", "--api-key", "k", "--api-secret", "s"]
        assert app_main(opts, argv) == EXIT_FAILURE
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("callboard:")]
    assert line.startswith(
        f"callboard: error: cannot serve the worker's HTTP endpoints on 127.0.0.1:{port}"
    )
    assert "address already in use" in line and "option port" in line


# -- connect --room: one job, then exit -----------------------------------------------------


@pytest.mark.parametrize("agent_name", [AGENT, ""], ids=["named", "automatic-dispatch"])
async def test_connect_runs_exactly_one_job_then_exits(agent_name: str) -> None:
    """As livekit-agents' `connect`: the worker does not register, the room is created, one
    job runs here (none through the server's dispatch, so no automatic one besides it)."""
    env = {"CALLBOARD_TEST_JOB_S": "0.2", ENV_AGENT_NAME: agent_name}
    async with (
        run_server(ServerConfig(port=0, keys={KEY: SECRET})) as server,
        control(server, KEY, SECRET) as ctl,
        agent_process(server, "connect", "--room", "r1", **env) as worker,
    ):
        code = await worker.wait_exit()
        rooms = await ctl.lk.room.list_rooms(api.ListRoomsRequest(names=["r1"]))
        dispatched = await ctl.jobs("r1")
    errors = [line for line in worker.stderr if line.startswith("callboard: error:")]
    assert code == EXIT_OK and errors == []
    ended = [line for line in worker.stderr if "job ended" in line]
    assert len(ended) == 1 and "JS_SUCCESS" in ended[0], worker.stderr
    assert [r.name for r in rooms.rooms] == ["r1"]
    # the server offered the room's automatic dispatch to nobody: no worker registered
    assert [j.state.worker_id for j in dispatched if j.state.worker_id] == []


async def test_sigkill_of_the_worker_leaves_no_job_process_behind() -> None:
    """SOFT CHECK (LeakedChildProcesses warning, see warn_if_alive): a worker killed outright
    cannot clean up; the zygote and the job processes must notice and go by themselves."""
    async with (
        run_server(ServerConfig(port=0, keys={KEY: SECRET})) as server,
        control(server, KEY, SECRET) as ctl,
        aiohttp.ClientSession() as http,
        agent_process(server) as worker,
    ):
        await wait_until(
            lambda: any(s.agent_name == AGENT for s in server.engine.workers),
            "the agent to register",
            STARTUP_DEADLINE_S,
        )
        await ctl.dispatch("killed", AGENT, "30")
        await worker.poll_info(http, lambda i: len(i["jobs"]) == 1, "the job to run")
        spawned = descendants(worker.proc.pid)
        assert spawned, "the zygote and the job process are the worker's descendants"
        worker.proc.kill()
        assert await worker.wait_exit() == -9
        await warn_if_alive(spawned)


async def test_an_invalid_option_in_the_agent_script_itself_exits_2_with_one_line(
    tmp_path: Path,
) -> None:
    script = tmp_path / "bad_agent.py"
    script.write_text(
        "from callboard import JobContext, WorkerOptions, cli\n"
        "async def entry(ctx: JobContext) -> None: ...\n"
        "cli.run_app(WorkerOptions(entrypoint_fnc=entry, load_threshold=2.0))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "start",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), EXIT_DEADLINE_S)
    assert proc.returncode == EXIT_USAGE
    (line,) = err.decode().splitlines()
    assert line.startswith("callboard: error: invalid worker options: load_threshold must be")
