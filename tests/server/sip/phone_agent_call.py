"""The seed's phone call end to end, run by tests/server/sip/test_phone_agent.py as
`python -m tests.server.sip.phone_agent_call WORKDIR` in a process of its own.

It moves into a private network namespace (the agent's WebRTC needs a non-loopback address;
nothing leaves the machine), starts `callboard server --sip-port`, the receptionist example
under callboard's worker (tests/server/sip/agents/phone_receptionist.py), provisions a trunk and
an individual dispatch rule, and calls in with callboard's SIP phone: µ-law both ways. The phone
hears the greeting, says a sentence (hibari), hears the answer, sends a DTMF digit, and hangs
up. What it heard is transcribed offline (Whisper tiny.en); the job's end is read from the
server's log and the worker's.

Output in WORKDIR: report.json, agent.jsonl, worker.log, server.log. Exit status SKIP_EXIT when
the namespace cannot be had.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Final

import numpy as np

from callboard.plugins.local import models
from callboard.server.sip.audio import resample
from callboard.server.sip.codecs import FRAME_SAMPLES, SAMPLE_RATE, Pcm
from callboard.server.sip.phone import ActiveCall, SipPhone, rms, utterance
from callboard.server.sip.uac import DialTarget
from tests.interop.livekit_server import (
    API_KEY,
    API_SECRET,
    HOST,
    ServerProcess,
    became_healthy,
    clean_env,
    free_port,
    stop_process,
)
from tests.interop.media_call import REPORT_FILE, SKIP_EXIT, server_job_ended
from tests.interop.netns import NetnsUnavailable, enter_private_network
from tests.interop.support import wait_until
from tests.server.sip.agents.phone_receptionist import REPORT_ENV
from tests.server.sip.provisioning import trunk_and_rule

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
AGENT_SCRIPT: Final = REPO_ROOT / "tests" / "server" / "sip" / "agents" / "phone_receptionist.py"
CALLER: Final = "+56975231235"
CALLED: Final = "+15550100"
CALLER_SAYS: Final = "Hello, I would like to book an appointment for Monday, please."
DIGIT: Final = "5"
REGISTER_TIMEOUT_S: Final = 90.0
REPLY_TIMEOUT_S: Final = 40.0
JOB_END_TIMEOUT_S: Final = 30.0
CALL_TIMEOUT_S: Final = 240.0


def start_callboard(workdir: Path) -> tuple[ServerProcess, int]:
    port, sip_port = free_port(), free_port()
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "callboard.cli",
                "--log-format",
                "json",
                "server",
                "--port",
                str(port),
                "--sip-port",
                str(sip_port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    server = ServerProcess("callboard", port, proc, log_path)
    if not became_healthy(server):
        raise RuntimeError(f"callboard server did not start:\n{server.log_tail()}")
    return server, sip_port


def start_worker(server: ServerProcess, workdir: Path) -> subprocess.Popen[bytes]:
    env = clean_env() | {
        "LIVEKIT_URL": server.ws_url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "PYTHONPATH": str(REPO_ROOT),
        REPORT_ENV: str(workdir / "agent.jsonl"),
    }
    with open(workdir / "worker.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(AGENT_SCRIPT), "start"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )


def agent_events(workdir: Path, event: str) -> list[dict[str, Any]]:
    path = workdir / "agent.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, filter(None, lines)) if e["event"] == event]


def transcribe(frames: list[Pcm]) -> str:
    pcm16k = resample(np.concatenate(frames), SAMPLE_RATE, 16000)
    text, _ = models.whisper().transcribe(pcm16k.astype("<i2").tobytes(), "en")
    return text


async def converse(call: ActiveCall, workdir: Path, report: dict[str, Any]) -> None:
    heard = call.result.heard
    first, end = await wait_until(lambda: utterance(heard, 0), "the greeting", REPLY_TIMEOUT_S)
    report["greeting"] = transcribe(heard[first:end])
    said = models.hibari_voice().synthesize(CALLER_SAYS, 1.0)
    speech = resample(np.frombuffer(said, dtype="<i2"), 24000, SAMPLE_RATE)
    call.media.play(speech)
    await asyncio.sleep(len(speech) / SAMPLE_RATE)
    spoke = len(heard)
    first, end = await wait_until(lambda: utterance(heard, spoke), "the answer", REPLY_TIMEOUT_S)
    report["answer"] = transcribe(heard[first:end])
    report["answer_after_s"] = round((first - spoke) * FRAME_SAMPLES / SAMPLE_RATE, 2)
    call.media.send_digit(DIGIT)
    report["dtmf"] = await wait_until(
        lambda: agent_events(workdir, "dtmf"), "the agent's sip_dtmf_received", 10.0
    )


async def run(workdir: Path, report: dict[str, Any]) -> None:
    server, sip_port = start_callboard(workdir)
    worker = start_worker(server, workdir)
    try:
        worker_log = lambda: (workdir / "worker.log").read_text(errors="replace")  # noqa: E731
        await wait_until(
            lambda: "registered worker" in worker_log() or worker.poll() is not None,
            "the worker to register",
            REGISTER_TIMEOUT_S,
        )
        assert worker.poll() is None, worker_log()[-3000:]
        await trunk_and_rule(server.http_url, CALLED)
        async with SipPhone() as phone:
            target = DialTarget(HOST, sip_port, CALLED, CALLER)
            invited = time.monotonic()
            call = await phone.dial(target)
            report["invite_to_200_s"] = round(time.monotonic() - invited, 2)
            report["status"] = call.result.status
            assert call.answered, f"{call.result.status} {call.result.reason}"
            try:
                await converse(call, workdir, report)
            finally:
                heard = call.result.heard
                report["heard_s"] = len(heard) * FRAME_SAMPLES / SAMPLE_RATE
                report["heard_max_rms"] = max((rms(f) for f in heard), default=0.0)
                await call.hang_up()
        (job,) = agent_events(workdir, "job")
        report["room"] = job["room"]
        report["server_ended"] = await wait_until(
            lambda: server_job_ended(server, job["job_id"]), "the job's end", JOB_END_TIMEOUT_S
        )
        report["closing_logged"] = await wait_until(
            lambda: "closing agent session due to participant disconnect" in worker_log(),
            "the agent session to close",
            JOB_END_TIMEOUT_S,
        )
        report["agent"] = [
            e
            for e in agent_events(workdir, "user_transcript") + agent_events(workdir, "agent_state")
        ]
    finally:
        stop_process(worker)
        stop_process(server.proc)


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    report: dict[str, Any] = {"skip": None, "error": None}
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        report["skip"] = str(e)
        (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        return SKIP_EXIT
    warnings.filterwarnings("ignore", message="The HMAC key is")
    code = 0
    try:
        models.whisper(), models.hibari_voice()
        asyncio.run(asyncio.wait_for(run(workdir, report), CALL_TIMEOUT_S))
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        code = 1
    (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
