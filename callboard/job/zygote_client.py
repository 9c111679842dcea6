"""The worker's side of the zygote: start it, ask it for processes (with their sockets
attached), hear about their exits, close it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Final

from callboard.job import ipc
from callboard.log import get_logger

log = get_logger("job.zygote")

ZYGOTE_BOOT_TIMEOUT_S: Final = 60.0
ZYGOTE_EXIT_TIMEOUT_S: Final = 5.0


class ZygoteError(Exception):
    """The zygote could not start: the agent module failed to import, or it died at boot."""


SINGLE_THREAD_ENV: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def zygote_env(extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """The worker's environment plus `extra`, with numeric libraries held to one thread (unless
    the user chose otherwise): the zygote must be single-threaded when it forks, and one job
    process needs no BLAS thread pool of its own."""
    env = {**os.environ, **dict(extra)}
    for name in SINGLE_THREAD_ENV:
        env.setdefault(name, "1")
    return env


class ZygoteClient:
    """Starts the zygote, asks it for processes, hears about their exits."""

    def __init__(self, config: ipc.ZygoteConfig, on_exit: Callable[[int, int], None]) -> None:
        self._config = config
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._token = 0
        self._forks: dict[int, asyncio.Future[tuple[int, socket.socket | None]]] = {}
        self._ready: asyncio.Future[ipc.ZygoteReady] | None = None
        self.pid = 0
        self.inference_methods: tuple[str, ...] = ()
        self.children: set[int] = set()
        """Live processes forked by this zygote."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callboard.job.zygote",
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            env=zygote_env(self._config.env),
        )
        theirs.close()
        self._control = ours
        ipc.send_blocking(ours, self._config)
        ours.setblocking(False)
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            async with asyncio.timeout(ZYGOTE_BOOT_TIMEOUT_S):
                ready = await asyncio.shield(self._ready)
        except TimeoutError:
            raise ZygoteError(f"zygote did not start within {ZYGOTE_BOOT_TIMEOUT_S:g}s") from None
        if ready.error:
            raise ZygoteError(ready.error)
        self.pid = ready.pid
        self.inference_methods = ready.inference_methods
        for failure in ready.preload_failures:
            log.warning(
                "a before-fork preload failed in the zygote: each job process loads that itself",
                extra={"pid": ready.pid, "error": failure},
            )
        log.info("zygote ready", extra={"pid": ready.pid})

    def _on_readable(self) -> None:
        assert self._control is not None
        while True:
            try:
                msg, fds = ipc.recv_packet(self._control)
            except BlockingIOError:
                return
            except (OSError, ipc.IpcError) as e:
                log.error("zygote channel broken", extra={"error": str(e)})
                msg, fds = None, []
            if msg is None:
                self._lost()
                return
            self._dispatch(msg, fds)

    def _dispatch(self, msg: ipc.Message, fds: list[int]) -> None:
        if isinstance(msg, ipc.Forked):
            fut = self._forks.pop(msg.token, None)
            sock = socket.socket(fileno=fds[0]) if fds else None
            self.children.add(msg.pid)
            if fut is not None and not fut.done():
                fut.set_result((msg.pid, sock))
            elif sock is not None:
                sock.close()
        elif isinstance(msg, ipc.ChildExited):
            self.children.discard(msg.pid)
            self._on_exit(msg.pid, msg.returncode)
        elif (
            isinstance(msg, ipc.ZygoteReady) and self._ready is not None and not self._ready.done()
        ):
            self._ready.set_result(msg)

    def _lost(self) -> None:
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(ipc.ZygoteReady(0, "zygote exited during boot"))
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(ZygoteError("zygote exited"))
        self._forks.clear()

    async def fork(
        self, kind: str = ipc.FORK_JOB, warm: bool = False
    ) -> tuple[int, socket.socket | None]:
        """A new child of the zygote: its pid and, for a job process, the worker's socket;
        `warm`: a process for the warm pool (see ipc.ForkRequest)."""
        if self._control is None:
            raise ZygoteError("zygote is not running")
        self._token += 1
        fut: asyncio.Future[tuple[int, socket.socket | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._forks[self._token] = fut
        try:
            self._control.send(ipc.encode(ipc.ForkRequest(self._token, kind, warm)))
        except OSError as e:
            self._forks.pop(self._token, None)
            raise ZygoteError(f"zygote unreachable: {e}") from None
        return await fut

    async def aclose(self) -> None:
        if self._control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._proc is not None:
            try:
                async with asyncio.timeout(ZYGOTE_EXIT_TIMEOUT_S):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
