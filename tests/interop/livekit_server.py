"""Build, start and stop the servers the interop tests compare: the real livekit-server (Go,
built from the Go module proxy into a per-user cache the first time) and `callboard server`.

Both run as subprocesses on free loopback ports with the dev keys `devkey` / `secret`, log to a
file, and are stopped by their own PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# v1.13.6+ replaces modules with forks the Go module proxy refuses (403); v1.13.5 builds.
LIVEKIT_SERVER_VERSION: Final = "v1.13.5"
LIVEKIT_SERVER_PACKAGE: Final = "github.com/livekit/livekit-server/cmd/server"
CACHE_DIR: Final = Path.home() / ".cache" / "callboard" / "livekit-server" / LIVEKIT_SERVER_VERSION
BINARY_NAME: Final = "server"
BUILD_TIMEOUT_S: Final = 1200.0
START_TIMEOUT_S: Final = 30.0
STOP_GRACE_S: Final = 10.0
START_ATTEMPTS: Final = 3

API_KEY: Final = "devkey"
API_SECRET: Final = "secret"
HOST: Final = "127.0.0.1"

GO_MISSING: Final = (
    "the real livekit-server is built with Go and `go` is not on PATH: install Go >= 1.23 "
    "(e.g. apt-get install golang, or https://go.dev/dl/), then rerun; the first run builds "
    f"livekit-server {LIVEKIT_SERVER_VERSION} into {CACHE_DIR}"
)


class ServerUnavailable(Exception):
    """The real server cannot be had on this machine (no Go): tests using it skip."""


def free_port(kind: int = socket.SOCK_STREAM, host: str = HOST) -> int:
    """A port the kernel says is free on `host` (the loopback address) right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def livekit_server_binary() -> Path:
    """The cached livekit-server binary, built with `go install` if it is missing.

    A file lock serialises concurrent builders (parallel sessions); the build goes to a temporary
    GOBIN and is renamed into place, so a half-written binary is never seen.
    """
    binary = CACHE_DIR / BINARY_NAME
    if os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if go is None:
        raise ServerUnavailable(GO_MISSING)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(binary, os.X_OK):
            return binary
        gobin = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE_DIR))
        try:
            env = {**os.environ, "GOBIN": str(gobin)}
            result = subprocess.run(
                [go, "install", f"{LIVEKIT_SERVER_PACKAGE}@{LIVEKIT_SERVER_VERSION}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            built = gobin / BINARY_NAME
            if result.returncode != 0 or not built.exists():
                raise RuntimeError(
                    f"building livekit-server {LIVEKIT_SERVER_VERSION} failed "
                    f"(exit {result.returncode}):\n{result.stderr[-4000:]}"
                )
            os.replace(built, binary)
        finally:
            shutil.rmtree(gobin, ignore_errors=True)
    return binary


@dataclass
class ServerProcess:
    """A server subprocess this test session started, and where to reach it."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def clean_env() -> dict[str, str]:
    """The environment without LIVEKIT_* settings that would change a server's or worker's keys,
    URL or agent name behind the test's back."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}


def livekit_server_config(port: int, media_ip: str | None = None) -> str:
    """HTTP/WebSocket on the loopback address. With `media_ip` (an interface address of a network
    namespace the test made, see tests/interop/netns.py) WebRTC media is advertised on that
    address only, and the STUN server handed to clients is a dead port on it: without one,
    livekit-server hands clients Google's and Twilio's public STUN servers (and with its own UDP
    port as STUN server, UDP connectivity checks failed and ICE fell back to TCP)."""
    ip = media_ip or HOST
    tcp, udp = free_port(host=ip), free_port(socket.SOCK_DGRAM, ip)
    rtc = f"tcp_port: {tcp}, udp_port: {udp}, use_external_ip: false, node_ip: {ip}"
    # a dead local port as STUN server: never hand clients the public defaults
    stun = f"{ip}:{free_port(socket.SOCK_DGRAM, ip)}"
    rtc += f', stun_servers: ["{stun}"]'
    if media_ip is not None:
        rtc += f', ips: {{includes: ["{media_ip}/32"]}}'
    return (
        f"port: {port}\n"
        f'bind_addresses: ["{HOST}"]\n'
        f"rtc: {{{rtc}}}\n"
        f"keys: {{{API_KEY}: {API_SECRET}}}\n"
        "logging: {level: info, json: true}\n"
    )


def _command(kind: str, port: int, binary: Path | None, media_ip: str | None) -> list[str]:
    if kind == "livekit-server":
        assert binary is not None
        return [str(binary), "--config-body", livekit_server_config(port, media_ip)]
    return [
        sys.executable,
        "-m",
        "callboard.cli",
        "--log-format",
        "json",
        "server",
        "--port",
        str(port),
    ]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1.0) as resp:
            return bool(resp.status == 200 and resp.read().strip() == b"OK")
    except (urllib.error.URLError, OSError):
        return False


def became_healthy(server: ServerProcess) -> bool:
    """Wait until `GET /` answers OK; False (the process stopped) if it died or took too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.proc.poll() is None:
        if _healthy(server.http_url):
            return True
        time.sleep(0.1)
    stop_process(server.proc)
    return False


def start_server(kind: str, log_dir: Path, media_ip: str | None = None) -> ServerProcess:
    """Start `kind` ("callboard" or "livekit-server") and wait until `GET /` answers OK.

    Retries on a fresh port when the process dies early (a port taken between pick and bind).
    `media_ip`: see `livekit_server_config`.
    """
    binary = livekit_server_binary() if kind == "livekit-server" else None
    return start_until_healthy(
        kind, kind, lambda port: _command(kind, port, binary, media_ip), log_dir
    )


def start_until_healthy(
    kind: str, label: str, command: Callable[[int], list[str]], log_dir: Path
) -> ServerProcess:
    """Run `command(port)` on a free port until `GET /` answers OK; logs to `<label>-N.log`.

    Retries on a fresh port when the process dies early (a port taken between pick and bind).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        log_path = log_dir / f"{label}-{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        server = ServerProcess(kind, port, proc, log_path)
        if became_healthy(server):
            return server
        failures.append(f"attempt {attempt + 1} (port {port}):\n{server.log_tail(1500)}")
    raise RuntimeError(f"{label} did not become healthy:\n" + "\n".join(failures))


def start_livekit_node(log_dir: Path, label: str, redis_address: str) -> ServerProcess:
    """One node of a multi-node livekit-server: the loopback config of `livekit_server_config`
    plus the shared Redis at `redis_address` (host:port), which makes it a cluster member."""
    binary = livekit_server_binary()

    def command(port: int) -> list[str]:
        config = livekit_server_config(port) + f"redis: {{address: {redis_address}}}\n"
        return [str(binary), "--config-body", config]

    return start_until_healthy("livekit-server", label, command, log_dir)


def stop_process(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM this one process, SIGKILL it if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


@contextlib.contextmanager
def running_server(kind: str, log_dir: Path) -> Iterator[ServerProcess]:
    server = start_server(kind, log_dir)
    try:
        yield server
    finally:
        stop_process(server.proc)


def start_livekit_server_with_redis(log_dir: Path, redis_address: str) -> ServerProcess:
    """livekit-server on a free loopback port storing its state (and SIP trunks and rules) in the
    Redis at `redis_address` (`host:port`): without Redis it refuses every SIP call."""
    return start_livekit_node(log_dir, "livekit-server-redis", redis_address)
