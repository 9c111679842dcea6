"""Voice activity detection: livekit-agents' own silero plugin, its model shared.

`livekit-plugins-silero` ships the silero ONNX model inside its wheel and runs it with
onnxruntime (no torch), about 0.1 ms of CPU per 32 ms frame, so each call keeps its own
stream in its job process. The onnxruntime session is built once per process and, under
callboard's worker, once in the zygote before it forks (`callboard.job.preload`): building it in
each job process wrote ~30 MB of private pages per process (measured in bench/README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import TYPE_CHECKING, Final

from livekit.agents import vad

from callboard.job.preload import before_fork
from callboard.plugins.local.models import VOICE_EXTRA_HINT

if TYPE_CHECKING:
    from livekit.plugins import silero

MIN_SILENCE_DURATION: Final = 0.55
"""Silence that ends a caller's utterance (livekit's default; turn latency starts after it)."""

_model_lock = threading.Lock()
_model: silero.VAD | None = None
"""silero's VAD with its defaults: its session (the model) and options are the template."""


def load_vad(*, min_silence_duration: float = MIN_SILENCE_DURATION) -> vad.VAD:
    """silero VAD at 16 kHz; cheap after the first call in a process (the model is shared)."""
    from livekit.plugins import silero

    model = shared_model()
    # silero.VAD.load() would build a new onnxruntime session; these two attributes of the
    # pinned plugin (livekit-plugins-silero 1.8.9) are what its constructor takes instead
    opts = dataclasses.replace(model._opts, min_silence_duration=min_silence_duration)
    return silero.VAD(session=model._onnx_session, opts=opts)


def shared_model() -> silero.VAD:
    """The process's silero model, built on first use (or inherited from the zygote)."""
    global _model
    with _model_lock:
        if _model is None:
            try:
                from livekit.plugins import silero
            except ImportError as e:
                raise ImportError(f"livekit-plugins-silero is missing: {VOICE_EXTRA_HINT}") from e
            loaded = silero.VAD.load()
            assert isinstance(loaded, silero.VAD)
            _model = loaded
        return _model


def _share_with_job_processes() -> None:
    """Zygote hook: build the model before the forks, when the plugin is installed."""
    with contextlib.suppress(ImportError):
        shared_model()


before_fork(_share_with_job_processes)
