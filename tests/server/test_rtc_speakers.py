"""Active speakers from RTP audio levels, as livekit-server decides them: a window of 400 ms
that was loud at least 40 % of the time makes a speaker; silence or no packets end it."""

from __future__ import annotations

from typing import Final

from callboard.server.rtc.speakers import (
    ACTIVE_THRESHOLD,
    AudioLevel,
    active_speakers,
    speaker_changes,
)

TICKS_PER_PACKET: Final = 960  # 20 ms at 48 kHz
LOUD: Final = 20  # -20 dBov
QUIET: Final = 90


def feed(meter: AudioLevel, levels: list[int], start_s: float = 0.0) -> float:
    """One packet per 20 ms with these levels; the time after the last."""
    now = start_s
    for i, level in enumerate(levels):
        now = start_s + i * 0.02
        meter.observe(level, i * TICKS_PER_PACKET + int(start_s * 48000), now)
    return now


def test_speech_makes_a_speaker_and_silence_ends_it() -> None:
    meter = AudioLevel(48000)
    now = feed(meter, [LOUD] * 41)
    assert meter.level(now) >= ACTIVE_THRESHOLD
    now = feed(meter, [QUIET] * 41, start_s=now + 0.02)
    assert meter.level(now) < ACTIVE_THRESHOLD
    assert AudioLevel(48000).level(0.0) == 0.0


def test_a_short_blip_is_not_speech() -> None:
    meter = AudioLevel(48000)
    now = feed(meter, [LOUD] * 5 + [QUIET] * 36)  # 100 of 400 ms loud: under 40 %
    assert meter.level(now) == 0.0


def test_a_track_that_stops_sending_stops_speaking() -> None:
    meter = AudioLevel(48000)
    now = feed(meter, [LOUD] * 41)
    assert meter.level(now + 0.81) == 0.0  # two windows without a packet


def test_changes_name_new_speakers_and_the_ones_that_stopped() -> None:
    before = active_speakers([("PA_a", 0.5), ("PA_b", 0.0)])
    assert before == {"PA_a": 0.5}
    now = active_speakers([("PA_a", 0.0), ("PA_b", 0.3)])
    changes = speaker_changes(before, now)
    assert [(s.sid, s.active, s.level) for s in changes] == [
        ("PA_b", True, 0.375),  # quantized to eighths, as livekit-server does
        ("PA_a", False, 0.0),
    ]
    assert speaker_changes(now, dict(now)) == []
