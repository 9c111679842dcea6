"""Shared inference: one process holds the models every job uses (e.g. end-of-turn detection);
jobs call `ctx.inference_executor.do_inference(method, data)`.

Runners register by method name (`InferenceRunner.register_runner`, as in livekit-agents);
the runners livekit-agents' plugins register (`_InferenceRunner.registered_runners`, e.g. the
turn detector's) are served the same way when the agent imported livekit.agents.
Under the PROCESS executor the zygote forks one inference process that listens on an abstract
Unix socket named after the zygote's pid; job processes (its siblings) connect on first use.
Under the THREAD executor runners are called in-process on a worker thread.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
import threading
import traceback
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Final, Protocol

from callboard.job import heap, ipc
from callboard.log import get_logger

log = get_logger("job.inference")

INFERENCE_THREADS: Final = 2


LIVEKIT_RUNNERS_MODULE: Final = "livekit.agents.inference_runner"


class InferenceError(RuntimeError):
    """An inference call failed (unknown method, runner error, inference process gone); a
    RuntimeError, as livekit-agents raises for a failed inference."""


class InferenceRunner(ABC):
    """A model served to every job. Subclass, set INFERENCE_METHOD, register at import time."""

    INFERENCE_METHOD: ClassVar[str]
    registered_runners: ClassVar[dict[str, type[InferenceRunner]]] = {}

    @classmethod
    def register_runner(cls, runner_class: type[InferenceRunner]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("inference runners must be registered on the main thread")
        method = runner_class.INFERENCE_METHOD
        if method in cls.registered_runners:
            raise ValueError(f"an inference runner for {method!r} is already registered")
        cls.registered_runners[method] = runner_class

    @abstractmethod
    def initialize(self) -> None:
        """Load models; runs once in the inference process before any request."""

    @abstractmethod
    def run(self, data: bytes) -> bytes | None:
        """One inference (blocking is fine: it runs on a thread of the inference process)."""


class InferenceExecutor(Protocol):
    async def do_inference(self, method: str, data: bytes) -> bytes | None: ...


def socket_name(zygote_pid: int) -> str:
    """Abstract-namespace address of the inference process of the zygote `zygote_pid`."""
    return f"\0callboard-inference-{zygote_pid}"


def registered_runners() -> dict[str, type[Any]]:
    """Every runner to host: callboard's and, if the agent imported livekit.agents, those its
    plugins registered with livekit-agents (looked up, never imported, from here)."""
    runners: dict[str, type[Any]] = dict(InferenceRunner.registered_runners)
    theirs = sys.modules.get(LIVEKIT_RUNNERS_MODULE)
    if theirs is not None:
        for method, cls in theirs._InferenceRunner.registered_runners.items():
            if method in runners:
                raise ValueError(f"an inference runner for {method!r} is registered twice")
            runners[method] = cls
    return runners


def initialize_runners() -> dict[str, Any]:
    """Instantiate and initialize every registered runner (in the inference process)."""
    runners = {m: cls() for m, cls in registered_runners().items()}
    for runner in runners.values():
        runner.initialize()
    return runners


class LocalInference:
    """THREAD executor flavour: runners live in the worker process."""

    def __init__(self, runners: dict[str, Any]) -> None:
        self._runners = runners
        self._pool = ThreadPoolExecutor(INFERENCE_THREADS, thread_name_prefix="inference")

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        runner = self._runners.get(method)
        if runner is None:
            raise InferenceError(f"no inference runner registered for {method!r}")
        return await asyncio.get_running_loop().run_in_executor(self._pool, runner.run, data)


class InferenceClient:
    """Job-process side: one connection to the inference process, requests matched by id."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._channel: ipc.FrameProtocol | None = None
        self._pending: dict[int, asyncio.Future[bytes | None]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def _connect(self) -> ipc.FrameProtocol:
        async with self._lock:
            if self._channel is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self._address)
                except OSError as e:
                    sock.close()
                    raise InferenceError(f"inference process unreachable: {e}") from None
                _, self._channel = await asyncio.get_running_loop().create_unix_connection(
                    lambda: ipc.FrameProtocol(self._on_message, self._on_close), sock=sock
                )
            return self._channel

    def _on_message(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.InferenceResponse):
            fut = self._pending.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                if msg.error:
                    fut.set_exception(InferenceError(msg.error))
                else:
                    fut.set_result(msg.data)

    def _on_close(self, error: Exception | None) -> None:
        self._channel = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(InferenceError("inference process connection closed"))
        self._pending.clear()

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        channel = await self._connect()
        request_id = next(self._ids)
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        channel.send(ipc.InferenceRequest(request_id, method, data))
        return await fut


def inference_main(zygote_pid: int) -> int:
    """Body of the inference process: initialize runners, then serve requests."""
    try:
        runners = initialize_runners()
    except Exception:
        log.exception("inference runners failed to initialize")
        return 3
    return asyncio.run(_serve(socket_name(zygote_pid), runners))


async def _serve(address: str, runners: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(INFERENCE_THREADS, thread_name_prefix="inference")

    async def answer(channel: ipc.FrameProtocol, req: ipc.InferenceRequest) -> None:
        runner = runners.get(req.method)
        try:
            if runner is None:
                raise InferenceError(f"no inference runner registered for {req.method!r}")
            result = await loop.run_in_executor(pool, runner.run, req.data)
            channel.send(ipc.InferenceResponse(req.request_id, result, ""))
        except Exception as e:
            detail = f"{type(e).__name__}: {e}"
            log.error(
                "inference failed",
                extra={"method": req.method, "traceback": traceback.format_exc()},
            )
            channel.send(ipc.InferenceResponse(req.request_id, None, detail))

    inflight: set[asyncio.Task[None]] = set()

    def make_protocol() -> ipc.FrameProtocol:
        holder: list[ipc.FrameProtocol] = []

        def on_message(msg: ipc.Message) -> None:
            if isinstance(msg, ipc.InferenceRequest):
                task = loop.create_task(answer(holder[0], msg))
                inflight.add(task)
                task.add_done_callback(inflight.discard)

        proto = ipc.FrameProtocol(on_message, lambda _e: None)
        holder.append(proto)
        return proto

    server = await loop.create_unix_server(make_protocol, path=address)
    log.info("inference process ready", extra={"pid": os.getpid(), "methods": sorted(runners)})
    try:
        await heap.trim_periodically()  # until the zygote (or its death signal) stops us
    finally:
        server.close()
    return 0
