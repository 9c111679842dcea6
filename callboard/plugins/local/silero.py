"""The silero VAD model, run for one audio stream: windows in, speech probabilities out.

`SileroModel` wraps the onnxruntime session of the silero model that `livekit-plugins-silero`
ships (one per process, shared by every stream) and remembers the last windows it computed:
an `AgentSession` runs two VAD streams over the same audio (its turn detection, and the
`stt.StreamAdapter` that segments a non-streaming STT), and the model is deterministic, so the
second stream's window with the same input and the same recurrent state is answered from the
memo instead of run again. `Windows` is one stream's state: the model's recurrent state and
context, and the audio resampled to the model's rate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Final

import numpy as np
import numpy.typing as npt

SAMPLE_RATES: Final = (8000, 16000)
"""The rates the silero model takes."""
WINDOW_SECONDS: Final = 0.032
"""A window is 512 samples at 16 kHz, 256 at 8 kHz."""
CONTEXT_SAMPLES: Final = {8000: 32, 16000: 64}
"""Samples of the previous window the model sees again before each window."""
STATE_SHAPE: Final = (2, 1, 128)
MEMO_WINDOWS: Final = 64
"""Windows remembered per model (2 s of audio): enough for two streams of one call that run a
few windows apart."""
INT16_SCALE: Final = 1.0 / 32768.0
WARM_UP_RUNS: Final = 3

Float32Array = npt.NDArray[np.float32]


class SileroModel:
    """The shared onnxruntime session, with a memo of recently computed windows."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._memo: OrderedDict[bytes, tuple[float, Float32Array]] = OrderedDict()
        self._lock = threading.Lock()
        self.runs = 0
        self.reused = 0

    def warm_up(self) -> None:
        """Run a few windows at each rate: onnxruntime sets up what a session's first runs
        need then (~6 MB), so that done in the zygote is shared by every job process, not
        written again in each."""
        noise = np.random.default_rng(0)  # silence alone leaves the set-up to the first sound
        for rate in SAMPLE_RATES:
            window = int(rate * WINDOW_SECONDS) + CONTEXT_SAMPLES[rate]
            state = np.zeros(STATE_SHAPE, dtype=np.float32)
            for _ in range(WARM_UP_RUNS):
                sound = noise.uniform(-0.5, 0.5, (1, window)).astype(np.float32)
                _, state = self._run(rate, sound, state)

    def _run(
        self, rate: int, model_input: Float32Array, state: Float32Array
    ) -> tuple[Any, Float32Array]:
        out, next_state = self.session.run(
            None, {"input": model_input, "state": state, "sr": np.array(rate, dtype=np.int64)}
        )
        return out, next_state

    def infer(
        self, rate: int, model_input: Float32Array, state: Float32Array
    ) -> tuple[float, Float32Array]:
        """Speech probability of `model_input` (context + window) and the next state."""
        key = rate.to_bytes(2, "little") + model_input.tobytes() + state.tobytes()
        with self._lock:
            found = self._memo.get(key)
            if found is not None:
                self.reused += 1
                return found
        out, next_state = self._run(rate, model_input, state)
        result = (float(out.item()), next_state)
        with self._lock:
            self.runs += 1
            self._memo[key] = result
            if len(self._memo) > MEMO_WINDOWS:
                self._memo.popitem(last=False)
        return result


class LinearResampler:
    """Mono int16 at `in_rate` → float32 in [-1, 1) at `out_rate`, by linear interpolation
    across chunk boundaries (a VAD needs no more: livekit's silero uses a quick one too)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.step = in_rate / out_rate
        self._last = 0.0
        self._next = 0.0
        """Where the next output sample falls, in input samples from the next chunk's start."""

    def push(self, pcm: npt.NDArray[np.int16]) -> Float32Array:
        samples = pcm.astype(np.float32) * INT16_SCALE
        if self.step == 1.0:
            return samples
        n = len(samples)
        if n == 0 or self._next > n - 1:
            self._next -= n
            if n:
                self._last = float(samples[-1])
            return np.zeros(0, dtype=np.float32)
        count = int((n - 1 - self._next) // self.step) + 1
        at = self._next + self.step * np.arange(count)
        extended = np.concatenate(([self._last], samples))
        out: Float32Array = np.interp(at + 1.0, np.arange(n + 1), extended).astype(np.float32)
        self._next = self._next + self.step * count - n
        self._last = float(samples[-1])
        return out


class Windows:
    """One stream's audio cut into model windows, and the model's state between them."""

    def __init__(self, model: SileroModel, rate: int) -> None:
        self.model = model
        self.rate = rate
        self.size = round(rate * WINDOW_SECONDS)
        self._context = CONTEXT_SAMPLES[rate]
        self._input = np.zeros((1, self._context + self.size), dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, samples: Float32Array) -> list[float]:
        """Speech probability of each window completed by `samples` (at the model's rate)."""
        pending = np.concatenate((self._pending, samples)) if len(self._pending) else samples
        probabilities = []
        start = 0
        while len(pending) - start >= self.size:
            window = pending[start : start + self.size]
            self._input[0, : self._context] = self._input[0, -self._context :]
            self._input[0, self._context :] = window
            p, self._state = self.model.infer(self.rate, self._input, self._state)
            probabilities.append(p)
            start += self.size
        self._pending = pending[start:].copy()
        return probabilities
