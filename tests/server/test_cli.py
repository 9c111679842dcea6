"""`callboard server`: bad options exit 2 with one clear line; a signal stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from callboard.cli import EXIT_OK, EXIT_USAGE, install_stop, main
from callboard.log import root_logging_kept
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, KEYS_ENV
from callboard.simworker import SimWorker
from tests.server.support import wait_until

STARTUP_DEADLINE_S: Final = 15.0
STOP_DEADLINE_S: Final = 5.0


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """`main` installs its log handler on the root logger; put the test's logging back."""
    with root_logging_kept():
        yield


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)


def callboard_command() -> list[str]:
    """The installed console script, or the module when run from a bare checkout."""
    script = Path(sys.executable).with_name("callboard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "callboard.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_public_host_with_dev_keys_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["server", "--host", "0.0.0.0", "--port", "0"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("callboard: error: refusing to listen on 0.0.0.0 with the public dev")
    assert "--keys" in line and "--dev" in line


def test_malformed_keys_exit_2_without_echoing_the_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["server", "--keys", "mykey s3cr3t-value", "--port", "0"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("callboard: error: invalid API key entry #1: expected 'key: secret'")
    assert "s3cr3t" not in line


def test_console_script_refuses_a_public_host_with_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
    done = subprocess.run(
        [*callboard_command(), "server", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == EXIT_USAGE
    (line,) = done.stderr.splitlines()
    assert line.startswith("callboard: error: refusing to listen on 0.0.0.0")
    assert done.stdout == ""


async def wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    """Poll GET / until it answers OK; fail if the server exits or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DEADLINE_S
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.returncode is None, "the server exited during start-up"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200 and await resp.text() == "OK":
                        return
            except aiohttp.ClientConnectionError:
                pass
            if loop.time() > deadline:
                raise AssertionError(f"the server did not answer at {url} in time")
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "with_worker"),
    [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
    ids=["sigterm-idle", "sigterm-with-worker", "sigint-with-worker"],
)
async def test_signal_stops_the_server_cleanly(signum: signal.Signals, with_worker: bool) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
    proc = await asyncio.create_subprocess_exec(
        *callboard_command(),
        "--log-format",
        "json",
        "server",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    sim: SimWorker | None = None
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/", proc)
        if with_worker:
            sim = SimWorker(f"ws://127.0.0.1:{port}", DEV_API_KEY, DEV_API_SECRET)
            await sim.start()
        proc.send_signal(signum)
        _, stderr = await asyncio.wait_for(proc.communicate(), STOP_DEADLINE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if sim is not None:
            await sim.aclose()
    assert proc.returncode == EXIT_OK
    log = stderr.decode()
    assert '"server stopped"' in log
    assert "Traceback" not in log


async def test_a_second_signal_exits_at_once_when_the_shutdown_hangs() -> None:
    """A server whose shutdown waits on a stuck thread would ignore every later SIGTERM (seen
    with servers orphaned in a dead network namespace): the second signal exits."""
    stop = asyncio.Event()
    exits: list[int] = []
    install_stop(stop, exits.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), STOP_DEADLINE_S)
        assert exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_until(lambda: bool(exits), "an exit after the second signal")
        assert exits == [128 + signal.SIGTERM]
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
