"""Processes the reliability tests start and stop themselves: `callboard server` and agent
scripts, on 127.0.0.1 and free ports, logs captured to files, stopped by PID only.

The process trees are watched as they run (`TreeWatch`), so that whatever a worker forked can
be checked after it exits: a leaked process is one still alive (not a zombie) with the same pid
and start time as one seen in a tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import aiohttp
import psutil
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

LOOPBACK: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 40.0
POLL_S: Final = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def callboard_command() -> list[str]:
    """`callboard`, the console script of this interpreter's environment (or the same entry
    point through `python -c` when the script is not installed)."""
    script = Path(sys.executable).with_name("callboard")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from callboard.cli import main; sys.exit(main())"]


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log file, one per line; other lines (raw tracebacks) skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


def non_json_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("{")]


def memory(pid: int) -> tuple[int, int]:
    """(RSS, USS) in bytes."""
    info = psutil.Process(pid).memory_full_info()
    return int(info.rss), int(getattr(info, "uss", info.rss))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class TreeWatch:
    """Every process seen below the watched roots, by (pid, start time)."""

    seen: dict[int, float] = field(default_factory=dict)

    def sample(self, root: int) -> None:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(child.pid, child.create_time())

    def alive(self) -> list[psutil.Process]:
        """Processes seen in a tree that still run (same pid and start time, not a zombie)."""
        out = []
        for pid, started in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    async def wait_all_gone(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for every process seen to end; describe (and kill) the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Processes that are not our children have no exit event to wait on: poll.
        while self.alive() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
        described = []
        for proc in self.alive():
            with contextlib.suppress(psutil.Error):
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
                proc.kill()
        return described


class ChildProcess:
    """A subprocess whose stderr (and stdout) is appended to `log_path`."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=self.env,
        )

    async def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S
    ) -> int:
        """Send `sig` to this pid and wait for the exit code (SIGKILL if it does not exit)."""
        proc = self.proc
        assert proc is not None, "not started"
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._close_log()
        assert proc.returncode is not None
        return proc.returncode

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class ServerProcess(ChildProcess):
    """`callboard server` on 127.0.0.1:`port` with the keys given through LIVEKIT_KEYS."""

    def __init__(self, port: int, keys: Mapping[str, str], log_path: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["LIVEKIT_KEYS"] = ", ".join(f"{k}: {v}" for k, v in keys.items())
        argv = [*callboard_command(), "--log-format", "json", "server"]
        super().__init__([*argv, "--host", LOOPBACK, "--port", str(port)], env, log_path)
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Spawn and wait until `/` answers."""
        await self.spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            if not self.running:
                raise RuntimeError(f"callboard server exited at start; see {self.log_path}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(self.http_url + "/") as resp:
                    if resp.status == 200:
                        return
            if loop.time() > deadline:
                raise RuntimeError(f"callboard server did not answer in {START_TIMEOUT_S:g}s")
            await asyncio.sleep(POLL_S)


class AgentProcess(ChildProcess):
    """`python <script> start` with LIVEKIT_* set and the worker's HTTP server on `http_port`."""

    def __init__(
        self,
        script: Path,
        env: Mapping[str, str],
        http_port: int,
        log_path: Path,
        http_port_env: str,
    ) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env, http_port_env: str(http_port)}
        super().__init__([sys.executable, str(script), "start"], full_env, log_path)
        self.http_port = http_port

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    async def info(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        """GET /worker, or None when the worker does not answer."""
        try:
            async with http.get(self.http_url + "/worker") as resp:
                if resp.status != 200:
                    return None
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, OSError, ValueError):
            return None

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The unlabelled and `state`-labelled samples of GET /metrics, by name."""
        out: dict[str, float] = {}
        try:
            async with http.get(self.http_url + "/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError):
            return out
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        return out

    async def wait_registered(
        self, http: aiohttp.ClientSession, other_than: str = "", timeout: float = START_TIMEOUT_S
    ) -> str:
        """Wait until /worker shows a registration (with an id other than `other_than`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"agent exited before registering; see {self.log_path}")
            info = await self.info(http)
            if info and info["id"] and info["id"] != other_than and info["state"] == "available":
                return str(info["id"])
            if loop.time() > deadline:
                raise RuntimeError(f"agent did not register in {timeout:g}s: {info}")
            await asyncio.sleep(POLL_S)


class TwirpCallError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class Twirp:
    """Protobuf Twirp calls to a server process, each with the token the caller gives."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self._http = http
        self.base_url = base_url

    async def call(self, route: str, req: Message, resp_type: type[M], token: str) -> M:
        headers = {"Content-Type": "application/protobuf", "Authorization": f"Bearer {token}"}
        url = f"{self.base_url}/twirp/{route}"
        async with self._http.post(url, data=req.SerializeToString(), headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TwirpCallError(resp.status, body.decode(errors="replace"))
        return resp_type.FromString(body)
