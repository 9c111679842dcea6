"""Voice activity detection: the silero model that `livekit-plugins-silero` ships, as a
livekit-agents `vad.VAD` that costs a call little CPU.

livekit's own `silero.VAD` stream resamples every frame through the rtc SDK (a protobuf round
trip to its native library) and hands each 32 ms window to a thread pool; in a call's job
process that overhead cost several times the inference itself, twice over (an `AgentSession`
runs one stream for turn detection and one inside the STT's `StreamAdapter`). This stream
resamples with numpy, runs the (0.2 ms) inference inline, and the second stream of a call reuses
the first one's results (`silero.SileroModel`). Events, options and defaults are those of
livekit's plugin. The onnxruntime session is built once per process and, under callboard's
worker, once in the zygote before it forks (`callboard.job.preload`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from livekit import rtc
from livekit.agents import vad
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given

from callboard.job.preload import before_fork
from callboard.log import get_logger
from callboard.plugins.local.models import VOICE_EXTRA_HINT
from callboard.plugins.local.silero import (
    SAMPLE_RATES,
    WINDOW_SECONDS,
    LinearResampler,
    SileroModel,
    Windows,
)

log = get_logger("plugins.local")

MIN_SILENCE_DURATION: Final = 0.55
"""Silence that ends a caller's utterance (livekit's default; turn latency starts after it)."""
SMOOTHING: Final = 0.35
"""Weight of the previous smoothed probability (livekit's silero plugin uses the same)."""


@dataclass(frozen=True)
class VADOptions:
    """When speech starts and ends; the defaults are livekit's silero plugin's."""

    min_speech_duration: float = 0.05
    """Speech needed before START_OF_SPEECH."""
    min_silence_duration: float = MIN_SILENCE_DURATION
    """Silence needed before END_OF_SPEECH."""
    prefix_padding_duration: float = 0.5
    """Audio before the detected start that an utterance's frames include."""
    max_buffered_speech: float = 60.0
    """Longest utterance kept (later audio of it is dropped)."""
    activation_threshold: float = 0.5
    """Probability from which a window is speech."""
    deactivation_threshold: float | None = None
    """Probability under which speech ends (default activation - 0.15, at least 0.01)."""
    sample_rate: int = 16000
    """The model's rate: 16000 or 8000."""

    def __post_init__(self) -> None:
        if self.sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate={self.sample_rate}: silero takes 8000 or 16000")
        if not 0 < self.activation_threshold < 1:
            raise ValueError("activation_threshold must be in (0, 1)")
        if self.deactivation_threshold is not None and self.deactivation_threshold <= 0:
            raise ValueError("deactivation_threshold must be greater than 0")
        for name in ("min_speech_duration", "min_silence_duration", "prefix_padding_duration"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_buffered_speech <= 0:
            raise ValueError("max_buffered_speech must be positive")

    @property
    def exit_threshold(self) -> float:
        if self.deactivation_threshold is not None:
            return self.deactivation_threshold
        return max(self.activation_threshold - 0.15, 0.01)


class SileroVAD(vad.VAD):
    """silero voice activity detection; each `stream()` follows one audio track."""

    def __init__(self, model: SileroModel, options: VADOptions | None = None) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=WINDOW_SECONDS))
        self.silero = model
        self.options = options or VADOptions()

    @property
    def model(self) -> str:
        return "silero"

    @property
    def provider(self) -> str:
        return "ONNX"

    @property
    def min_silence_duration(self) -> float:
        return self.options.min_silence_duration

    def stream(self) -> SileroStream:
        return SileroStream(self)

    def update_options(
        self,
        *,
        min_speech_duration: NotGivenOr[float] = NOT_GIVEN,
        min_silence_duration: NotGivenOr[float] = NOT_GIVEN,
        prefix_padding_duration: NotGivenOr[float] = NOT_GIVEN,
        max_buffered_speech: NotGivenOr[float] = NOT_GIVEN,
        activation_threshold: NotGivenOr[float] = NOT_GIVEN,
        deactivation_threshold: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """livekit's silero signature; streams apply the new options from their next window."""
        given = {k: v for k, v in locals().items() if k != "self" and is_given(v)}
        self.options = dataclasses.replace(self.options, **given)


class SileroStream(vad.VADStream):
    """One track's VAD: START_OF_SPEECH, INFERENCE_DONE per 32 ms window, END_OF_SPEECH with
    the utterance (prefix padding included) at the input's rate, as livekit's silero stream."""

    def __init__(self, detector: SileroVAD) -> None:
        self._detector = detector
        self._rate = 0
        self._reset()
        super().__init__(detector)

    def _reset(self) -> None:
        self._windows = Windows(self._detector.silero, self._detector.options.sample_rate)
        self._resampler: LinearResampler | None = None
        self._input = np.zeros(0, dtype=np.int16)
        """Input-rate audio not yet covered by a window."""
        self._input_fraction = 0.0
        self._buffer = np.zeros(0, dtype=np.int16)
        """The utterance so far, or the prefix padding while silent (input rate)."""
        self._buffer_full = False
        self._smoothed: float | None = None
        self._speaking = False
        self._speech = self._silence = 0.0
        self._raw_speech = self._raw_silence = 0.0
        self._window_index = 0

    async def _main_task(self) -> None:
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                self._reset()
            elif isinstance(item, rtc.AudioFrame):
                self._push(item)

    def _push(self, frame: rtc.AudioFrame) -> None:
        if not self._rate:
            self._rate = frame.sample_rate
        elif frame.sample_rate != self._rate:
            raise ValueError(
                f"a {frame.sample_rate} Hz frame in a {self._rate} Hz VAD stream: one rate only"
            )
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if self._resampler is None:
            self._resampler = LinearResampler(self._rate, self._windows.rate)
        started = time.perf_counter()
        probabilities = self._windows.push(self._resampler.push(pcm))
        self._input = np.concatenate((self._input, pcm))
        per_window = (time.perf_counter() - started) / max(len(probabilities), 1)
        for p in probabilities:
            self._window_done(p, per_window)

    def _window_done(self, probability: float, inference_s: float) -> None:
        opts = self._detector.options
        window_s = self._windows.size / self._windows.rate
        take = self._windows.size * self._rate / self._windows.rate + self._input_fraction
        count = int(take)
        self._input_fraction = take - count
        audio, self._input = self._input[:count], self._input[count:]
        self._keep(audio, opts)
        p = (
            probability
            if self._smoothed is None
            else (SMOOTHING * self._smoothed + (1 - SMOOTHING) * probability)
        )
        self._smoothed = p
        self._window_index += 1
        if self._speaking:
            self._speech += window_s
        else:
            self._silence += window_s
        self._send(
            vad.VADEventType.INFERENCE_DONE,
            frames=[self._frame(audio)],
            probability=p,
            inference_duration=inference_s,
            raw_accumulated_silence=self._raw_silence,
            raw_accumulated_speech=self._raw_speech,
        )
        if p >= opts.activation_threshold or (self._speaking and p > opts.exit_threshold):
            self._raw_speech += window_s
            self._raw_silence = 0.0
            if not self._speaking and self._raw_speech >= opts.min_speech_duration:
                self._speaking, self._silence, self._speech = True, 0.0, self._raw_speech
                self._send(vad.VADEventType.START_OF_SPEECH, frames=[self._frame(self._buffer)])
            return
        self._raw_silence += window_s
        self._raw_speech = 0.0
        if not self._speaking:
            self._trim_to_padding(opts)
        elif self._raw_silence >= opts.min_silence_duration:
            self._speaking, self._silence = False, self._raw_silence
            speech = max(0.0, self._speech - self._raw_silence)
            self._send(
                vad.VADEventType.END_OF_SPEECH,
                frames=[self._frame(self._buffer)],
                speech_duration=speech,
            )
            self._speech = 0.0
            self._trim_to_padding(opts)

    def _keep(self, audio: np.ndarray[Any, np.dtype[np.int16]], opts: VADOptions) -> None:
        limit = int((opts.max_buffered_speech + opts.prefix_padding_duration) * self._rate)
        room = limit - len(self._buffer)
        if room <= 0:
            if not self._buffer_full:
                self._buffer_full = True
                log.warning("max_buffered_speech reached, ignoring further audio of this utterance")
            return
        self._buffer = np.concatenate((self._buffer, audio[:room]))

    def _trim_to_padding(self, opts: VADOptions) -> None:
        keep = int(opts.prefix_padding_duration * self._rate)
        if len(self._buffer) > keep:
            self._buffer = self._buffer[len(self._buffer) - keep :]
            self._buffer_full = False

    def _frame(self, pcm: np.ndarray[Any, np.dtype[np.int16]]) -> rtc.AudioFrame:
        return rtc.AudioFrame(pcm.tobytes(), self._rate, 1, len(pcm))

    def _send(self, kind: vad.VADEventType, **fields: Any) -> None:
        fields.setdefault("speech_duration", self._speech)
        self._event_ch.send_nowait(
            vad.VADEvent(
                type=kind,
                samples_index=self._window_index * self._windows.size,
                timestamp=self._window_index * WINDOW_SECONDS,
                silence_duration=self._silence,
                speaking=self._speaking,
                **fields,
            )
        )


_session_lock = threading.Lock()
_model: SileroModel | None = None


def load_vad(*, min_silence_duration: float = MIN_SILENCE_DURATION) -> SileroVAD:
    """silero VAD at 16 kHz; cheap after the first call in a process (the model is shared)."""
    return SileroVAD(shared_model(), VADOptions(min_silence_duration=min_silence_duration))


def shared_model() -> SileroModel:
    """The process's silero model, built on first use (or inherited from the zygote)."""
    global _model
    with _session_lock:
        if _model is None:
            try:
                from livekit.plugins.silero import onnx_model
            except ImportError as e:
                raise ImportError(f"livekit-plugins-silero is missing: {VOICE_EXTRA_HINT}") from e
            _model = SileroModel(onnx_model.new_inference_session(force_cpu=True))
        return _model


def _share_with_job_processes() -> None:
    """Zygote hook: build and warm the model before the forks, when the plugin is installed."""
    with contextlib.suppress(ImportError):
        shared_model().warm_up()


before_fork(_share_with_job_processes)
