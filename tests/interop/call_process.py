"""A call script run as a process of its own (it enters a private network namespace first):
bounded in time, everything it started killed when it overruns, its report read back, and the
test skipped when this machine has no namespace to give it. Both halves live here: the test's
(`run_call_script`, or `start_call_script` for calls run side by side) and the script's
(`call_script_main`, `against_server`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psutil
import pytest

from tests.interop.livekit_server import (
    ServerProcess,
    ServerUnavailable,
    clean_env,
    livekit_server_binary,
    start_server,
    stop_process,
)
from tests.interop.netns import (
    MEDIA_IP,
    SKIP_EXIT,
    NetnsUnavailable,
    enter_private_network,
    unavailable_reason,
)

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
REPORT_FILE: Final = "report.json"
CALL_LOG: Final = "call.log"
KILL_WAIT_S: Final = 10.0
LOG_TAIL_CHARS: Final = 4000


@dataclass
class CallRun:
    """What the call process left behind in its workdir."""

    workdir: Path
    returncode: int
    report: dict[str, Any]
    logs: tuple[str, ...]
    """Files of the workdir whose tails explain a failure."""

    def jsonl(self, name: str, event: str) -> list[dict[str, Any]]:
        """The records of the workdir's JSON-lines file `name` whose "event" is `event`."""
        path = self.workdir / name
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == event]

    def log_records(self, message: str) -> list[dict[str, Any]]:
        """The call process's JSON log records (worker, and job logs it relayed) with `message`."""
        out = []
        for line in (self.workdir / CALL_LOG).read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("message") == message:
                        out.append(record)
        return out

    def context(self) -> str:
        """Shown when an assertion fails: the report and the logs' tails."""
        parts = [json.dumps(self.report, indent=1, default=str)[-6000:]]
        names = [*self.logs]
        server_log = self.report.get("server_log")
        for name in [*names, *([server_log] if server_log else [])]:
            with contextlib.suppress(OSError):
                text = (self.workdir / name).read_text(errors="replace")
                parts.append(f"--- {name} ---\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)

    def succeeded(self) -> dict[str, Any]:
        """The report, once the process exited 0 and reported no error."""
        assert self.returncode == 0 and self.report.get("error") is None, self.context()
        return self.report


def run_call_script(
    module: str,
    args: Sequence[str],
    workdir: Path,
    timeout: float,
    logs: Sequence[str] = (CALL_LOG,),
) -> CallRun:
    """`python -m module workdir *args`; past `timeout` it and all it started are killed."""
    return start_call_script(module, args, workdir, timeout, logs).finish()


@dataclass
class StartedCall:
    """A call script started and not waited for yet: calls that spend most of their time
    waiting on real-time audio run side by side, and each test then `finish()`es its own."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    deadline: float
    """time.monotonic() past which the script and all it started are killed."""
    logs: tuple[str, ...]

    def finish(self) -> CallRun:
        """Wait for the script (until its deadline), then read its report; skip the test when
        the script found no network namespace to run in."""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_family(self.proc)
        path = self.workdir / REPORT_FILE
        report = json.loads(path.read_text()) if path.exists() else {"error": "no report written"}
        if self.proc.returncode == SKIP_EXIT:
            pytest.skip(f"no private network namespace for media: {report.get('skip')}")
        return CallRun(self.workdir, self.proc.returncode, report, self.logs)

    def stop(self) -> None:
        """Kill the script and all it started if it still runs (a test that gave up on it)."""
        if self.proc.poll() is None:
            kill_family(self.proc)


def start_call_script(
    module: str,
    args: Sequence[str],
    workdir: Path,
    timeout: float,
    logs: Sequence[str] = (CALL_LOG,),
) -> StartedCall:
    """Start `python -m module workdir *args`, to be finished within `timeout` seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / CALL_LOG, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(workdir), *args],
            cwd=REPO_ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return StartedCall(proc, workdir, time.monotonic() + timeout, tuple(logs))


def finish_all(started: dict[str, StartedCall]) -> dict[str, CallRun]:
    """Each started call's run; the rest are stopped when one fails or skips."""
    try:
        return {key: call.finish() for key, call in started.items()}
    finally:
        for call in started.values():
            call.stop()


def side_by_side(
    request: pytest.FixtureRequest,
    param: str,
    start: Callable[[str], StartedCall],
) -> Iterator[dict[str, StartedCall | str]]:
    """For a module fixture: `start(kind)` for each server kind whose test the session selected
    (the values of parameter `param` of the requesting module's tests), all at once, as
    kind -> started call, or the reason the kind's server cannot be had here; every call still
    running is stopped when the module is done."""
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    started: dict[str, StartedCall | str] = {}
    try:
        for kind in selected_values(request, param):
            try:
                if kind == "livekit-server":
                    livekit_server_binary()  # built here, outside the namespace, if not cached
            except ServerUnavailable as e:
                started[kind] = str(e)
            else:
                started[kind] = start(kind)
        yield started
    finally:
        for call in started.values():
            if isinstance(call, StartedCall):
                call.stop()


def selected_values(request: pytest.FixtureRequest, param: str) -> list[Any]:
    """The values of parameter `param` in the selected tests of the requesting module."""
    values: dict[Any, None] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        in_module = getattr(item, "module", None) is request.module
        if in_module and callspec is not None and param in callspec.params:
            values[callspec.params[param]] = None
    return list(values)


def finished(started: dict[str, StartedCall | str], kind: str) -> CallRun:
    """The run of `kind`'s call started by `side_by_side` (the test skips if it had none)."""
    call = started[kind]
    if isinstance(call, str):
        pytest.skip(call)
    return call.finish()


def kill_family(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the call process and every process it started, one by one by PID."""
    try:
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if p.is_running():
                os.kill(p.pid, signal.SIGKILL)
    proc.wait(timeout=KILL_WAIT_S)


def call_script_main(workdir: Path, report: dict[str, Any], call: Callable[[], None]) -> int:
    """A call script's main(): enter a private network namespace (else exit SKIP_EXIT), run
    `call`, which fills `report`, then write the report with any error and the duration; exit
    1 when `call` raised, else 0."""
    report.update(skip=None, error=None)
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        report["skip"] = str(e)
        (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        return SKIP_EXIT
    warnings.filterwarnings("ignore", message="The HMAC key is")  # the public dev key pair
    started = time.monotonic()
    code = 0
    try:
        call()
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        code = 1
    report["duration_s"] = round(time.monotonic() - started, 2)
    (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return code


def load_meanwhile(load: Callable[[], object]) -> None:
    """Run `load` (the models the call needs later) in a thread while the script starts its
    server and worker; `load`'s parts must make their first user wait for the one load (as
    models.whisper() does)."""
    threading.Thread(target=load, name="preload", daemon=True).start()


def against_server(
    kind: str,
    workdir: Path,
    report: dict[str, Any],
    call: Callable[[ServerProcess], Awaitable[None]],
    timeout: float | None,
) -> None:
    """Start a server of `kind` in the namespace, run `call(server)` within `timeout` seconds
    (None: unbounded here), and stop the server whatever happened."""
    server = start_server(kind, workdir, media_ip=MEDIA_IP)
    report["server_log"] = str(server.log_path)

    async def bounded() -> None:
        await asyncio.wait_for(call(server), timeout)

    try:
        asyncio.run(bounded())
    finally:
        stop_process(server.proc)
