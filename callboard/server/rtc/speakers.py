"""Active speakers from the audio level the publisher's client puts in each RTP packet (RFC 6464
header extension, -dBov 0..127), without decoding; the rules and defaults are livekit-server's
(`pkg/sfu/audio/audiolevel.go`, `Room.audioUpdateWorker`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

from livekit.protocol import models

ACTIVE_LEVEL: Final = 35
"""-35 dBov: a packet at least this loud counts as speech."""
MIN_PERCENTILE: Final = 40
UPDATE_INTERVAL_MS: Final = 400
"""The observation window, and how often rooms tell their members about speakers."""
SMOOTH_INTERVALS: Final = 2
SILENT_LEVEL: Final = 127
QUANTIZATION: Final = 8
RTP_HALF_RANGE: Final = 1 << 31
RTP_MODULO: Final = 1 << 32


def linear(level_dbov: float) -> float:
    """-dBov → linear amplitude (1.0 is full scale)."""
    return float(10 ** (-level_dbov / 20))


ACTIVE_THRESHOLD: Final = linear(ACTIVE_LEVEL)
MIN_ACTIVE_MS: Final = MIN_PERCENTILE * UPDATE_INTERVAL_MS // 100
SMOOTH_FACTOR: Final = 2 / (SMOOTH_INTERVALS + 1)


class AudioLevel:
    """One track's speech level: each window of `UPDATE_INTERVAL_MS` of RTP time that was loud
    for at least `MIN_PERCENTILE` % moves the smoothed level towards its loudest packet."""

    def __init__(self, clock_rate: int) -> None:
        self._clock_rate = clock_rate
        self._last_ts: int | None = None
        self._observed_ms = 0.0
        self._active_ms = 0.0
        self._loudest = SILENT_LEVEL
        self.smoothed = 0.0
        self.observed_at = 0.0

    def observe(self, level: int, timestamp: int, now: float) -> None:
        """A packet with audio level `level` (-dBov) and RTP `timestamp`, arrived at `now`."""
        if self._last_ts is None:
            self._last_ts = timestamp
        step = (timestamp - self._last_ts) % RTP_MODULO
        if step >= RTP_HALF_RANGE:
            return  # reordered: older than what was seen
        self._last_ts = timestamp
        duration = step * 1000 / self._clock_rate
        self.observed_at = now
        self._observed_ms += duration
        if level <= ACTIVE_LEVEL:
            self._active_ms += duration
            self._loudest = min(self._loudest, level)
        if self._observed_ms >= UPDATE_INTERVAL_MS:
            smoothed = 0.0
            if self._active_ms >= MIN_ACTIVE_MS:
                weight = 20 * math.log10(self._active_ms / UPDATE_INTERVAL_MS)
                smoothed = self.smoothed + (linear(self._loudest - weight) - self.smoothed) * (
                    SMOOTH_FACTOR
                )
            self._reset(smoothed)

    def level(self, now: float) -> float:
        """The smoothed level; 0 when no packet came for two windows."""
        if now - self.observed_at >= 2 * UPDATE_INTERVAL_MS / 1000:
            self._reset(0.0)
        return self.smoothed

    def _reset(self, smoothed: float) -> None:
        self.smoothed = smoothed
        self._loudest = SILENT_LEVEL
        self._active_ms = self._observed_ms = 0.0


def active_speakers(levels: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Participant sid → quantized level, for those at or above the active threshold, loudest
    first."""
    active = sorted(((sid, v) for sid, v in levels if v >= ACTIVE_THRESHOLD), key=lambda x: -x[1])
    return {sid: math.ceil(v * QUANTIZATION) / QUANTIZATION for sid, v in active}


def speaker_changes(before: dict[str, float], now: dict[str, float]) -> list[models.SpeakerInfo]:
    """What livekit-server sends: speakers new or with a new level, and the ones that stopped
    (level 0, inactive)."""
    changed = [
        models.SpeakerInfo(sid=sid, level=level, active=True)
        for sid, level in now.items()
        if before.get(sid) != level
    ]
    changed += [
        models.SpeakerInfo(sid=sid, level=0.0, active=False) for sid in before if sid not in now
    ]
    return changed
