"""Models shared by every job of a worker: livekit-agents inference runners, and the call that
reaches them.

Importing this module registers the runners, so a worker that imported the agent (which imports
the plugins) starts one inference process holding Whisper and hibari for all its jobs — under
livekit-agents' worker and under callboard's alike. Outside a job (tests, a console, scripts)
the same engines load once in the calling process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Final

from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.ipc.inference_proc_executor import InferenceProcExecutor
from livekit.agents.job import get_job_context

from callboard.log import get_logger
from callboard.plugins.local import models

log = get_logger("plugins.local")

STT_METHOD: Final = "callboard_local_stt"
TTS_METHOD: Final = "callboard_local_tts"
_HEADER_END: Final = b"\n"
INFERENCE_INITIALIZE_TIMEOUT: Final = 300.0
"""livekit-agents' worker allows its inference process 5 minutes to load the models."""


def encode_request(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One JSON header line, then raw bytes (PCM): no base64 on the hot path."""
    return json.dumps(header).encode() + _HEADER_END + payload


def decode_request(data: bytes) -> tuple[dict[str, Any], bytes]:
    header, _, payload = data.partition(_HEADER_END)
    decoded: dict[str, Any] = json.loads(header)
    return decoded, payload


def run_stt(data: bytes) -> bytes:
    """{"language"} + 16 kHz int16 PCM → {"text", "confidence"}."""
    header, pcm = decode_request(data)
    text, confidence = models.whisper().transcribe(pcm, header["language"])
    return json.dumps({"text": text, "confidence": confidence}).encode()


def run_tts(data: bytes) -> bytes:
    """{"text", "speed"} (one sentence) → 24 kHz int16 PCM."""
    header, _ = decode_request(data)
    return models.hibari_voice().synthesize(header["text"], header["speed"])


_LOCAL_RUNS: Final = {STT_METHOD: run_stt, TTS_METHOD: run_tts}


class WhisperRunner(_InferenceRunner):
    """Whisper tiny.en in the worker's inference process."""

    INFERENCE_METHOD: ClassVar[str] = STT_METHOD

    def initialize(self) -> None:
        models.whisper()

    def run(self, data: bytes) -> bytes | None:
        return run_stt(data)


class HibariRunner(_InferenceRunner):
    """The hibari voice in the worker's inference process."""

    INFERENCE_METHOD: ClassVar[str] = TTS_METHOD

    def initialize(self) -> None:
        models.hibari_voice()

    def run(self, data: bytes) -> bytes | None:
        return run_tts(data)


class SharedInferenceUnavailable(RuntimeError):
    """The job's inference executor cannot serve our models (see the message for the fix)."""


_warned_local: set[str] = set()


async def infer(method: str, data: bytes) -> bytes:
    """Run `method` in the worker's inference process when inside a job, else in this process.

    A fake job (livekit-agents' testing context) has an executor that refuses every request;
    that too runs in this process.
    """
    ctx = get_job_context(required=False)
    if ctx is not None:
        try:
            result = await ctx.inference_executor.do_inference(method, data)
        except NotImplementedError:
            pass
        except Exception as e:
            raise SharedInferenceUnavailable(
                f"{method} failed in the shared inference process ({type(e).__name__}: {e}); "
                "if it is unknown there, import callboard.plugins.local at the top of the "
                "agent module, so that it is registered before the worker starts"
            ) from e
        else:
            if result is None:
                raise SharedInferenceUnavailable(f"{method} returned nothing")
            return result
    if method not in _warned_local:
        _warned_local.add(method)
        log.info(
            "no shared inference process: loading the model in this process",
            extra={"method": method, "pid": os.getpid()},
        )
    return await asyncio.to_thread(_LOCAL_RUNS[method], data)


@contextlib.asynccontextmanager
async def inference_process() -> AsyncIterator[InferenceProcExecutor]:
    """livekit-agents' own inference process with every registered runner, as its worker starts
    it: for programs that run sessions without a worker (pass it to `fake_job_context`)."""
    executor = InferenceProcExecutor(
        runners=_InferenceRunner.registered_runners,
        initialize_timeout=INFERENCE_INITIALIZE_TIMEOUT,
        close_timeout=5,
        memory_warn_mb=2000,
        memory_limit_mb=0,
        ping_interval=5,
        ping_timeout=60,
        high_ping_threshold=2.5,
        mp_ctx=mp.get_context("spawn"),
        loop=asyncio.get_running_loop(),
        http_proxy=None,
    )
    await executor.start()
    try:
        await executor.initialize()
        yield executor
    finally:
        await executor.aclose()


def _register() -> None:
    for runner in (WhisperRunner, HibariRunner):
        if runner.INFERENCE_METHOD in _InferenceRunner.registered_runners:
            continue
        try:
            _InferenceRunner.register_runner(runner)
        except RuntimeError:  # imported off the main thread: jobs load the models themselves
            log.warning(
                "callboard.plugins.local imported off the main thread: models not shared",
                extra={"method": runner.INFERENCE_METHOD},
            )


_register()
