"""The simulated phone caller's parts that need no room: its join token and room name are
shaped like LiveKit's SIP gateway's, its recording puts both sides on one timeline, and the
word error rate the tests and the demo judge transcripts by."""

from __future__ import annotations

import re
import wave
from pathlib import Path

import jwt
import numpy as np

from callboard.server.config import DEV_API_KEY, DEV_API_SECRET
from callboard.voice_caller import (
    RECORD_RATE,
    Recording,
    sip_caller_token,
    sip_room_name,
    word_error_rate,
)


def test_the_caller_joins_like_a_sip_participant() -> None:
    token = sip_caller_token(DEV_API_KEY, DEV_API_SECRET, "call-_+56975231235_x", "+56975231235")
    claims = jwt.decode(token, DEV_API_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "sip_+56975231235"
    assert claims["name"] == "Phone +56975231235"
    assert claims["kind"] == "sip"
    attrs = claims["attributes"]
    assert attrs["sip.phoneNumber"] == "+56975231235"
    assert attrs["sip.callStatus"] == "active"
    assert attrs["sip.callID"].startswith("SCL_")
    assert {"sip.trunkPhoneNumber", "sip.trunkID", "sip.ruleID"} <= attrs.keys()
    assert claims["video"]["room"] == "call-_+56975231235_x"


def test_room_names_follow_an_individual_dispatch_rule() -> None:
    assert re.fullmatch(r"call-_\+56975231235_[0-9A-Za-z]{12}", sip_room_name("+56975231235"))


def test_word_error_rate_ignores_case_punctuation_and_digit_spelling() -> None:
    assert word_error_rate("We're open nine to five, weekdays.", "we're open 9 to 5 weekdays") == 0
    assert word_error_rate("a b c d e", "a b x d e") == 0.2
    assert word_error_rate("a b c", "") == 1.0
    assert word_error_rate("a b c", "a b c d") == 1 / 3


def test_a_recording_is_both_sides_on_one_timeline(tmp_path: Path) -> None:
    rec = Recording()
    tone = np.full(RECORD_RATE // 10, 1000, dtype=np.int16)
    rec.put(0, rec.started, tone)
    rec.put(1, rec.started + 0.5, tone * 2)
    rec.save(tmp_path / "call.wav")
    with wave.open(str(tmp_path / "call.wav")) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, RECORD_RATE)
        both = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    half = RECORD_RATE // 2
    assert (both[: RECORD_RATE // 10, 0] == 1000).all() and (both[:half, 1] == 0).all()
    assert (both[half : half + RECORD_RATE // 10, 1] == 2000).all()
