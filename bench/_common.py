"""Shared helpers for the benchmarks: free ports, the server subprocess, percentiles, CPU times.

Everything a benchmark starts it stops itself, by PID, and everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

import psutil

LOOPBACK: Final = "127.0.0.1"
SERVER_START_TIMEOUT_S: Final = 20.0
SERVER_STOP_TIMEOUT_S: Final = 15.0
# `callboard ...` with this interpreter; the variants profile it or run it on uvloop.
_SERVER_MAIN: Final = "import sys; from callboard.cli import main; sys.exit(main())"
_PROFILED_MAIN: Final = (
    "import sys, cProfile; from callboard.cli import main; "
    "out = sys.argv.pop(1); cProfile.run('main()', out)"
)
_UVLOOP_MAIN: Final = (
    "import sys, uvloop; uvloop.install(); from callboard.cli import main; sys.exit(main())"
)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def machine_summary() -> str:
    """`2 cores, AMD EPYC, Linux 6.x, Python 3.11.x` — for the printed report."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {model or platform.machine()}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (not its children)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far, summed over all cores."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of some processes, and of the whole machine, at one moment."""

    per_pid: dict[int, float]
    machine: float

    @classmethod
    def take(cls, *pids: int) -> CpuSnapshot:
        return cls({pid: cpu_seconds(pid) for pid in pids}, machine_busy_seconds())

    def since(self, earlier: CpuSnapshot) -> tuple[dict[int, float], float]:
        """CPU seconds each process used since `earlier`, and what everything else used."""
        used = {pid: t - earlier.per_pid[pid] for pid, t in self.per_pid.items()}
        return used, max(0.0, self.machine - earlier.machine - sum(used.values()))


@dataclass
class ServerProcess:
    """`callboard server` in its own process on a free loopback port.

    `profile` writes a cProfile of the whole server run to that path (on orderly stop);
    `uvloop` runs it on uvloop's event loop (needs uvloop installed; measurement only).
    """

    log_level: str = "WARNING"
    profile: Path | None = None
    uvloop: bool = False
    port: int = 0
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("server is not started")
        return self._proc.pid

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        args = ["--log-level", self.log_level, "--log-format", "json"]
        args += ["server", "--host", LOOPBACK, "--port", str(self.port)]
        if self.uvloop:
            return [sys.executable, "-c", _UVLOOP_MAIN, *args]
        if self.profile is not None:
            return [sys.executable, "-c", _PROFILED_MAIN, str(self.profile), *args]
        return [sys.executable, "-c", _SERVER_MAIN, *args]

    def start(self) -> None:
        """Start it and wait until it answers on `/`; raises with its log tail if it does not."""
        if self.uvloop and self.profile is not None:
            raise ValueError("profile and uvloop cannot be combined")
        self.port = self.port or free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LIVEKIT_KEYS", None)  # the bench uses the dev keys
        with open(self.log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.http_url + "/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not answer within {SERVER_START_TIMEOUT_S:g}s")

    def stop(self) -> int | None:
        """SIGTERM (orderly stop, writes the profile), then SIGKILL if it hangs; the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> int:
        try:
            with open(self.log_path, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0


class HttpError(ConnectionError):
    """The connection broke, or the response was not one this client understands."""


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time, lean on purpose.

    Benchmarks send pre-built requests through it so that the client's own cost stays small
    next to the server's; it understands only responses with a Content-Length (what aiohttp's
    server sends for a body it knows), which is all the Twirp endpoints return.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._status = 0
        self._length = -1
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._closed_exc: BaseException | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_exc = exc or HttpError("connection closed by the server")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._closed_exc)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is None or self._waiter.done():
            return
        if self._length < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            try:
                self._status = int(head[0].split(" ", 2)[1])
                lengths = [
                    int(v)
                    for k, _, v in (h.partition(":") for h in head[1:])
                    if k.strip().lower() == "content-length"
                ]
                self._length = lengths[0]
            except (IndexError, ValueError):
                self._waiter.set_exception(HttpError(f"unsupported response head {head[:1]}"))
                return
        if len(self._buf) >= self._length:
            body = bytes(self._buf[: self._length])
            del self._buf[: self._length]
            self._length = -1
            self._waiter.set_result((self._status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one complete request (head and body); the response's status and body."""
        if self._closed_exc is not None:
            raise self._closed_exc
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def http_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    """A complete HTTP/1.1 POST, ready for `HttpConnection.request`."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
