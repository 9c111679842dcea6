"""A call through bench.caller_process against livekit-server, run by
tests/bench/test_caller_process.py as `python -m tests.bench.caller_calls WORKDIR`.

The process moves into a private network namespace (tests/interop/netns.py), starts
livekit-server, and drives one caller process the way bench/voice.py does: the caller dials,
an agent (an rtc participant named like livekit-agents' `agent-<job id>`) joins and plays a
tone, the bench tells the caller to listen, then hangs up on it. report.json holds the events
the caller process sent and the call's steps.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Final

import numpy as np
from livekit import api, rtc

from bench.caller_process import CallerProcesses
from tests.interop.call_process import against_server, call_script_main
from tests.interop.livekit_server import API_KEY, API_SECRET, ServerProcess

RATE: Final = 16000
FRAME: Final = RATE // 100
TONE_S: Final = 0.5
ROOM: Final = "call-_+56975231235_caller-process"
SAYS: Final = ("Hello.",)
STEP_TIMEOUT_S: Final = 20.0
HEARD_WAIT_S: Final = 0.5
"""The tone's last frames reach the caller well within this on loopback."""


def tone(seconds: float) -> np.ndarray[Any, Any]:
    t = np.arange(int(seconds * RATE)) / RATE
    return (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def voice(_sentence: str) -> tuple[bytes, int]:
    return tone(TONE_S).tobytes(), RATE


def token(identity: str, kind: str = "standard") -> str:
    grants = api.VideoGrants(room_join=True, room=ROOM)
    access = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_kind(kind)
    return access.with_grants(grants).to_jwt()


async def agent_plays_tone(url: str) -> tuple[rtc.Room, asyncio.Task[None]]:
    """An agent in the room that is silent for a second, then says a short tone."""
    room = rtc.Room()
    await room.connect(url, token("agent-AJ_test", "agent"))
    source = rtc.AudioSource(RATE, 1)
    await room.local_participant.publish_track(
        rtc.LocalAudioTrack.create_audio_track("agent", source),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
    )

    async def play() -> None:
        samples = np.concatenate([np.zeros(RATE, np.int16), tone(TONE_S)])
        for i in range(0, len(samples), FRAME):
            chunk = samples[i : i + FRAME]
            await source.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, len(chunk)))
        await source.wait_for_playout()

    return room, asyncio.create_task(play())


async def one_call(workdir: Path, url: str, report: dict[str, Any]) -> None:
    callers = CallerProcesses(1, voice, SAYS, workdir)
    await callers.start()
    agent: rtc.Room | None = None
    try:
        call = callers.dial(url, token("sip_+56975231235", "sip"), SAYS)
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await call.step("dialled")
            call.listen()
            agent, played = await agent_plays_tone(url)
            await call.step("agent joined")
            await played
            await asyncio.sleep(HEARD_WAIT_S)
        await call.hang_up()
        report["result"] = call.result
        report["steps"] = call.steps
    finally:
        if agent is not None:
            await agent.disconnect()
        await callers.aclose()
    report["caller_exit"] = callers.procs[0].proc.returncode


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    report: dict[str, Any] = {}

    async def calls(server: ServerProcess) -> None:
        await one_call(workdir, server.ws_url, report)

    def run() -> None:
        against_server("livekit-server", workdir, report, calls, 40.0)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
