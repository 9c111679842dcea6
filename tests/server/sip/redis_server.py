"""A throwaway redis-server on a free loopback port (Debian's `redis-server`), for the real
livekit-server, which keeps SIP trunks and rules in Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from tests.interop.livekit_server import HOST, free_port, stop_process

REDIS_MISSING: Final = "redis-server is not installed: apt-get install redis-server"
START_TIMEOUT_S: Final = 10.0


class RedisUnavailable(Exception):
    """No redis-server binary on this machine."""


def _pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running_redis(work_dir: Path) -> Iterator[str]:
    """`host:port` of a redis-server that keeps nothing on disk, stopped by its PID after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable(REDIS_MISSING)
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    args = ["--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    with open(work_dir / "redis.log", "wb") as log_file:
        proc = subprocess.Popen(
            [binary, *args, "--dir", str(work_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pings(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"{HOST}:{port}"
    finally:
        stop_process(proc)
