"""Offline text-to-speech as livekit-agents `tts.TTS`s: hibari (24 kHz neural voice, from the
`hibari-tts` wheel) first, Debian's `espeak-ng` CLI as the last resort that needs no model.

Both synthesize sentence by sentence; in an `AgentSession` livekit-agents streams them through
`tts.StreamAdapter` with its sentence tokenizer, so the first sentence plays while the rest of
the reply is still being written. `offline_tts()` chains them in a `tts.FallbackAdapter`.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from dataclasses import dataclass
from typing import Final, Never

from livekit.agents import APIConnectionError, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from callboard.log import get_logger
from callboard.plugins.local import models, runners

log = get_logger("plugins.local")

ESPEAK_BINARY: Final = "espeak-ng"
ESPEAK_SAMPLE_RATE: Final = 22050
"""What espeak-ng's standard voices produce (checked against each WAV header)."""
_WAV_HEADER: Final = 44
PCM_MIME: Final = "audio/pcm"


@dataclass(frozen=True)
class HibariOptions:
    speed: float = 1.0
    """hibari's pace, 0.5 (slow) to 2.0 (fast)."""

    def __post_init__(self) -> None:
        if not 0.5 <= self.speed <= 2.0:
            raise ValueError(f"speed={self.speed}: must be within 0.5..2.0")


class HibariTTS(tts.TTS[Never]):
    """hibari-tts' bundled voice, run in the worker's shared inference process inside a job."""

    def __init__(self, options: HibariOptions | None = None) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=models.TTS_SAMPLE_RATE,
            num_channels=1,
        )
        self.options = options or HibariOptions()

    @property
    def model(self) -> str:
        return f"hibari-{models.HIBARI_VOICE}"

    @property
    def provider(self) -> str:
        return "hibari-tts"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _HibariStream(tts=self, input_text=text, conn_options=conn_options)


class _HibariStream(tts.ChunkedStream):
    def __init__(self, *, tts: HibariTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._options = tts.options

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid("tts_"),
            sample_rate=models.TTS_SAMPLE_RATE,
            num_channels=1,
            mime_type=PCM_MIME,
        )
        for sentence in models.split_sentences(self.input_text):
            request = runners.encode_request({"text": sentence, "speed": self._options.speed})
            try:
                pcm = await runners.infer(runners.TTS_METHOD, request)
            except Exception as e:
                raise APIConnectionError(f"hibari failed: {e}", retryable=False) from e
            output_emitter.push(pcm)
        output_emitter.flush()


@dataclass(frozen=True)
class EspeakOptions:
    voice: str = "en-us"
    words_per_minute: int = 165

    def __post_init__(self) -> None:
        if not 80 <= self.words_per_minute <= 450:
            raise ValueError(f"words_per_minute={self.words_per_minute}: must be within 80..450")


class EspeakTTS(tts.TTS[Never]):
    """The `espeak-ng` command (Debian package `espeak-ng`, GPL, run as a separate program):
    robotic but instant and model-free, so it is the last engine of a fallback chain."""

    def __init__(self, options: EspeakOptions | None = None) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=ESPEAK_SAMPLE_RATE,
            num_channels=1,
        )
        self.options = options or EspeakOptions()

    @staticmethod
    def available() -> bool:
        return shutil.which(ESPEAK_BINARY) is not None

    @property
    def model(self) -> str:
        return self.options.voice

    @property
    def provider(self) -> str:
        return ESPEAK_BINARY

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _EspeakStream(tts=self, input_text=text, conn_options=conn_options)


class _EspeakStream(tts.ChunkedStream):
    def __init__(self, *, tts: EspeakTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._options = tts.options

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        wav = await espeak_wav(self.input_text, self._options)
        sample_rate, pcm = _split_wav(wav)
        if sample_rate != ESPEAK_SAMPLE_RATE:
            raise APIConnectionError(
                f"{ESPEAK_BINARY} produced {sample_rate} Hz, expected {ESPEAK_SAMPLE_RATE} Hz",
                retryable=False,
            )
        output_emitter.initialize(
            request_id=utils.shortuuid("tts_"),
            sample_rate=sample_rate,
            num_channels=1,
            mime_type=PCM_MIME,
        )
        output_emitter.push(pcm)
        output_emitter.flush()


async def espeak_wav(text: str, options: EspeakOptions) -> bytes:
    """A WAV of `text` spoken by espeak-ng (text on stdin, so it is never read as options)."""
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise APIConnectionError(
            f"{ESPEAK_BINARY} is not installed (apt-get install espeak-ng)", retryable=False
        )
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--stdout",
        "-v",
        options.voice,
        "-s",
        str(options.words_per_minute),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(text.encode())
    if proc.returncode != 0:
        raise APIConnectionError(
            f"{ESPEAK_BINARY} exited {proc.returncode}: {err.decode(errors='replace').strip()}",
            retryable=False,
        )
    return out


def _split_wav(wav: bytes) -> tuple[int, bytes]:
    """(sample rate, PCM) of espeak-ng's mono 16-bit WAV (its header sizes are left unset
    when it writes to a pipe, so the data is simply everything after the header)."""
    if len(wav) < _WAV_HEADER or wav[:4] != b"RIFF" or wav[36:40] != b"data":
        raise APIConnectionError(f"{ESPEAK_BINARY} produced no WAV", retryable=False)
    (sample_rate,) = struct.unpack_from("<I", wav, 24)
    return sample_rate, wav[_WAV_HEADER:]


def offline_tts(
    hibari: HibariOptions | None = None, espeak: EspeakOptions | None = None
) -> tts.FallbackAdapter:
    """hibari, then espeak-ng when it is installed (a machine without it keeps hibari alone)."""
    chain: list[tts.TTS[Never]] = [HibariTTS(hibari)]
    if EspeakTTS.available():
        chain.append(EspeakTTS(espeak))
    else:
        log.info(f"{ESPEAK_BINARY} not installed: no last-resort TTS behind hibari")
    return tts.FallbackAdapter(chain)
