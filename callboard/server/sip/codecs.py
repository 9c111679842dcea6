"""G.711 µ-law (PCMU) and A-law (PCMA), ITU-T G.711, as numpy lookup tables: 16-bit linear PCM
to one byte per sample and back. Tables are built once at import (vectorised, ~1 ms)."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

SAMPLE_RATE: Final = 8000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000

Pcm = npt.NDArray[np.int16]

_ULAW_BIAS: Final = 0x84
_ULAW_CLIP_14: Final = 8159
_ULAW_BIAS_14: Final = 0x21
_ULAW_SEGMENT_ENDS: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_decode_table() -> Pcm:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    """G.711's reference encoder (14-bit magnitude), as audioop and Sun's g711.c do it."""
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), _ULAW_CLIP_14) + _ULAW_BIAS_14
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude)
    encoded = (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    encoded = np.where(segment >= 8, 0x7F, encoded)
    return ((encoded ^ mask) & 0xFF).astype(np.uint8)


def _alaw_decode_table() -> Pcm:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    segment = (a & 0x70) >> 4
    t = np.where(segment == 0, t + 8, t + 0x108)
    t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    value = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, value)
    shift = np.where(segment < 2, 1, segment)
    encoded = (np.minimum(segment, 7) << 4) | ((value >> shift) & 0x0F)
    encoded = np.where(segment >= 8, 0x7F, encoded)
    return ((encoded ^ mask) & 0xFF).astype(np.uint8)


_ULAW_DECODE: Final = _ulaw_decode_table()
_ULAW_ENCODE: Final = _ulaw_encode_table()
_ALAW_DECODE: Final = _alaw_decode_table()
_ALAW_ENCODE: Final = _alaw_encode_table()


class G711:
    """One G.711 law: `encode(pcm) -> bytes`, `decode(bytes) -> pcm` (8 kHz, mono)."""

    def __init__(self, name: str, decode_table: Pcm, encode_table: npt.NDArray[np.uint8]):
        self.name = name
        self._decode = decode_table
        self._encode = encode_table

    def encode(self, pcm: Pcm) -> bytes:
        return self._encode[pcm.astype(np.int32) + 32768].tobytes()

    def decode(self, payload: bytes) -> Pcm:
        return self._decode[np.frombuffer(payload, dtype=np.uint8)]

    @property
    def silence(self) -> bytes:
        return self.encode(np.zeros(FRAME_SAMPLES, dtype=np.int16))


PCMU: Final = G711("PCMU", _ULAW_DECODE, _ULAW_ENCODE)
PCMA: Final = G711("PCMA", _ALAW_DECODE, _ALAW_ENCODE)
CODECS: Final = {"PCMU": PCMU, "PCMA": PCMA}
