"""A throwaway Redis for a test cluster: Debian's `redis-server` on a free loopback port, with no
persistence, stopped by its own PID. Missing binary → `RedisUnavailable` (the tests skip)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.interop.livekit_server import HOST, free_port, stop_process

START_TIMEOUT_S: Final = 10.0
REDIS_MISSING: Final = (
    "the cluster tests share a Redis between livekit-server nodes and `redis-server` is not on "
    "PATH: install it (apt-get install redis-server; .ci/system-packages.sh does it in CI)"
)


class RedisUnavailable(Exception):
    """No redis-server on this machine: tests using it skip."""


@dataclass
class RedisProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(log_dir: Path) -> RedisProcess:
    """Start redis-server on a free loopback port; returns once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable(REDIS_MISSING)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / "redis.log"
    command = [
        binary,
        *("--bind", HOST, "--port", str(port)),
        *("--save", "", "--appendonly", "no", "--protected-mode", "yes"),
        *("--dir", str(log_dir), "--daemonize", "no"),
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    redis = RedisProcess(proc, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers_ping(port):
            return redis
        time.sleep(0.05)
    redis.stop()
    raise RuntimeError(f"redis-server did not answer on {redis.address}:\n{log_path.read_text()}")
