"""The zygote: a single-threaded, loop-free process that imports the agent once and forks job
processes from itself in milliseconds (`python -m callboard.job.zygote <fd>`).

It talks to the worker over a SOCK_SEQPACKET socket: ZygoteConfig in, ZygoteReady out, then
ForkRequest → Forked (with the worker's end of the child's socket attached) and ChildExited for
every child it reaps. When the worker goes away it kills its children and exits.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, Final

from callboard.job import ipc
from callboard.job.child import ChildSpec, after_fork, child_main, prepare_for_forks, rehearse
from callboard.job.inference import inference_main, registered_runners
from callboard.job.preload import run_before_fork_hooks

EXIT_BOOT_FAILED: Final = 5
"""The agent module (or a preload) failed to import: respawning would fail the same way."""
AGENT_MODULE_ALIAS: Final = "__callboard_agent__"
START_FORK: Final = "fork"
START_SPAWN: Final = "spawn"
SPAWNED_INFERENCE_FLAG: Final = "--inference"


def resolve(ref: tuple[str, str, str]) -> Callable[..., Any]:
    """Import `module` (or the script at `path` when the module is __main__) and get `qualname`."""
    module_name, path, qualname = ref
    if module_name == "__main__":
        if not path:
            raise ImportError("the entrypoint lives in __main__ but its file is unknown")
        module = sys.modules.get(AGENT_MODULE_ALIAS)
        if module is None:
            spec = importlib.util.spec_from_file_location(AGENT_MODULE_ALIAS, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load the agent script {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[AGENT_MODULE_ALIAS] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{module_name}.{qualname} is not callable")
    return obj  # type: ignore[no-any-return]


def load_agent(config: ipc.ZygoteConfig) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """Put the worker's sys.path in place, import preloads and the agent: (entry, prewarm)."""
    for p in reversed(config.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    for name in config.preload:
        importlib.import_module(name)
    return resolve(config.entrypoint), resolve(config.prewarm) if config.prewarm else None


class Zygote:
    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._children: set[int] = set()
        self._entry: Callable[..., Any] | None = None
        self._prewarm: Callable[..., Any] | None = None
        self._config: ipc.ZygoteConfig | None = None
        self._wake_r, self._wake_w = os.pipe()

    def boot(self) -> int:
        msg, _ = ipc.recv_packet(self._control)
        if not isinstance(msg, ipc.ZygoteConfig):
            return EXIT_BOOT_FAILED
        self._config = msg
        try:
            self._entry, self._prewarm = load_agent(msg)
        except BaseException as e:
            error = f"agent import failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            ipc.send_blocking(self._control, ipc.ZygoteReady(os.getpid(), error))
            return EXIT_BOOT_FAILED
        methods = tuple(sorted(registered_runners()))
        failures = run_before_fork_hooks() if msg.start_method == START_FORK else ()
        ipc.send_blocking(self._control, ipc.ZygoteReady(os.getpid(), "", methods, failures))
        return 0

    def serve(self) -> int:
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            control = self._control.fileno()
            readable, _, _ = select.select([control, self._wake_r], [], [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            self._reap()
            if control in readable:
                msg, _ = ipc.recv_packet(self._control)
                if msg is None:
                    self._kill_children()
                    return 0
                if isinstance(msg, ipc.ForkRequest) and msg.kind == ipc.FORK_INFERENCE:
                    self._fork_inference(msg.token)
                elif isinstance(msg, ipc.ForkRequest):
                    self._fork(msg.token, msg.warm)

    def _fork(self, token: int, warm: bool) -> None:
        assert self._config is not None and self._entry is not None
        if self._config.start_method == START_SPAWN:
            self._spawn(token, inference=False)
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                parent_end.close()
                after_fork({child_end.fileno()})
                spec = ChildSpec(
                    self._entry,
                    self._prewarm,
                    self._config.log_level,
                    self._config.shutdown_timeout,
                    zygote_pid,
                    rehearse_job_start=warm,
                )
                code = child_main(child_end, spec)
            finally:
                os._exit(code)
        child_end.close()
        self._children.add(pid)
        ipc.send_blocking(self._control, ipc.Forked(token, pid), [parent_end.fileno()])
        parent_end.close()

    def _spawn(self, token: int, inference: bool) -> None:
        """`spawn` start method: a fresh interpreter (for libraries that cannot survive fork)
        that reads the config from its socket first; the zygote stays its parent and reaper."""
        assert self._config is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ipc.send_blocking(parent_end, self._config)
        child_end.set_inheritable(True)
        argv = [sys.executable, "-m", "callboard.job.spawned", str(child_end.fileno())]
        if inference:
            argv.append(SPAWNED_INFERENCE_FLAG)
        pid = os.posix_spawn(sys.executable, argv, os.environ)
        child_end.close()
        self._children.add(pid)
        if inference:
            parent_end.close()
            ipc.send_blocking(self._control, ipc.Forked(token, pid))
        else:
            ipc.send_blocking(self._control, ipc.Forked(token, pid), [parent_end.fileno()])
            parent_end.close()

    def _fork_inference(self, token: int) -> None:
        assert self._config is not None
        if self._config.start_method == START_SPAWN:
            self._spawn(token, inference=True)
            return
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                after_fork(set())
                code = inference_main(zygote_pid)
            finally:
                os._exit(code)
        self._children.add(pid)
        ipc.send_blocking(self._control, ipc.Forked(token, pid))

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            ipc.send_blocking(self._control, ipc.ChildExited(pid, code))

    def _kill_children(self) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[1]))
    zygote = Zygote(control)
    code = zygote.boot()
    if code:
        return code
    prepare_for_forks()
    if zygote._config is not None and zygote._config.start_method == START_FORK:
        rehearse(zygote._config.log_level)
    # Everything imported so far is shared with every child: moved out of the collector's
    # reach, a child's first full collection does not touch (and copy) those pages.
    gc.collect()
    gc.freeze()
    try:
        return zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        zygote._kill_children()
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
