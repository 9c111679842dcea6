"""The seed's phone call end to end, run by tests/server/sip/test_phone_agent.py as
`python -m tests.server.sip.phone_agent_call WORKDIR` in a process of its own.

It moves into a private network namespace (the agent's WebRTC needs a non-loopback address;
nothing leaves the machine), starts `callboard server --sip-port`, the receptionist example
under callboard's worker (tests/server/sip/agents/phone_receptionist.py), provisions a trunk and
an individual dispatch rule, and calls in with Debian's sipp as the phone: µ-law both ways.
sipp plays pcap files written here (the caller's sentence synthesized by hibari, then an RFC 4733
digit); its SDP names a UDP socket of this process as the phone's media address, so what the
gateway sends the phone is heard here. The test paces sipp (tests/server/sip/sipp.py
`paced_call`): it waits for the greeting, has sipp speak, waits for the answer, has sipp send
the digit and then hang up. What the phone heard is transcribed offline (Whisper tiny.en);
the job's end is read from the server's log and the worker's.

Output in WORKDIR: report.json, agent.jsonl, worker.log, server.log. Exit status SKIP_EXIT when
the namespace cannot be had.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import numpy as np

from callboard.plugins.local import models
from callboard.server.sip.audio import resample
from callboard.server.sip.codecs import SAMPLE_RATE, Pcm
from callboard.server.sip.phone import utterance
from tests.interop.call_process import call_script_main, load_meanwhile
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
from tests.interop.media_call import server_job_ended
from tests.interop.support import wait_until
from tests.server.sip.agents.phone_receptionist import REPORT_ENV
from tests.server.sip.phone_media import RtpSink, RtpStream, write_pcap
from tests.server.sip.provisioning import trunk_and_rule
from tests.server.sip.sipp import CALL_ID_FORMAT, notify_sipp, paced_call, run_sipp

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
AGENT_SCRIPT: Final = REPO_ROOT / "tests" / "server" / "sip" / "agents" / "phone_receptionist.py"
CALLER: Final = "+56975231235"
CALLED: Final = "+15550100"
CALLER_SAYS: Final = "Hello, what time are you open?"
DIGIT: Final = "5"
REGISTER_TIMEOUT_S: Final = 90.0
REPLY_TIMEOUT_S: Final = 40.0
JOB_END_TIMEOUT_S: Final = 30.0
CALL_TIMEOUT_S: Final = 240.0
TRAILING_SILENCE_S: Final = 2.0
"""The caller's silence after speaking: the agent's VAD needs it to end the turn."""
SIPP_END_TIMEOUT_S: Final = 20.0
DEPARTURE_TIMEOUT_S: Final = 1
"""The rule's rooms close this long after the caller left, which ends the agent's job (the
server's default, 20 s, would only be waited out)."""


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


def speech_pcaps(workdir: Path) -> tuple[Path, Path]:
    """What the caller says (hibari, 8 kHz µ-law, then the silence a phone keeps sending), and
    the DTMF digit after it: one RTP stream in two pcap files."""
    said = models.hibari_voice().synthesize(CALLER_SAYS, 1.0)
    speech = resample(np.frombuffer(said, dtype="<i2"), 24000, SAMPLE_RATE)
    stream = RtpStream().silence(0.5).audio(speech).silence(TRAILING_SILENCE_S)
    spoken = write_pcap(workdir / "speech.pcap", stream.take())
    return spoken, write_pcap(workdir / "dtmf.pcap", stream.digits(DIGIT).take())


async def heard_utterance(sink: RtpSink, since: int, what: str) -> tuple[str, int]:
    """The next thing the phone heard after frame `since`, transcribed; and its end frame."""
    heard = sink.heard
    first, end = await wait_until(lambda: utterance(heard, since), what, REPLY_TIMEOUT_S)
    return transcribe(heard[first:end]), end


async def converse(sink: RtpSink, sipp_port: int, workdir: Path, report: dict[str, Any]) -> None:
    """Greeting → the caller speaks → the answer → a DTMF digit → the caller hangs up."""
    report["greeting"], _ = await heard_utterance(sink, 0, "the greeting")
    notify_sipp(sipp_port, 1)  # play speech.pcap; the agent is quiet until it answers
    report["answer"], _ = await heard_utterance(sink, len(sink.heard), "the answer")
    notify_sipp(sipp_port, 2)  # play dtmf.pcap
    report["dtmf"] = await wait_until(
        lambda: agent_events(workdir, "dtmf"), "the agent's sip_dtmf_received", 10.0
    )
    notify_sipp(sipp_port, 3)  # BYE


async def call_with_sipp(sip_port: int, workdir: Path, report: dict[str, Any]) -> None:
    spoken, digits = speech_pcaps(workdir)
    sink, media_port = await RtpSink.open(HOST)
    sipp_port = free_port()
    steps = [f'<exec play_pcap_audio="{spoken}"/>', f'<exec play_pcap_audio="{digits}"/>']
    phone = asyncio.create_task(
        run_sipp(
            workdir / "sipp",
            paced_call(media_port, steps),
            sip_port,
            listen_port=sipp_port,
            timeout=CALL_TIMEOUT_S,
            extra_args=["-cid_str", CALL_ID_FORMAT],
        )
    )
    try:
        await converse(sink, sipp_port, workdir, report)
        run = await asyncio.wait_for(phone, SIPP_END_TIMEOUT_S)
        report["sipp"] = {"returncode": run.returncode, "errors": run.errors[-1000:]}
        assert run.returncode == 0, run.output + run.errors
    finally:
        phone.cancel()
        sink.close()


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
        report["trunk_id"], report["rule_id"] = await trunk_and_rule(
            server.http_url, CALLED, departure_timeout=DEPARTURE_TIMEOUT_S
        )
        await call_with_sipp(sip_port, workdir, report)
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
        report["answered"] = server_log_record(server, "sip call answered")
        for event in ("track_subscribed", "attributes_changed", "user_transcript", "agent_said"):
            report[event] = agent_events(workdir, event)
    finally:
        stop_process(worker)
        stop_process(server.proc)


def server_log_record(server: ServerProcess, message: str) -> dict[str, Any] | None:
    for line in server.log_path.read_text(errors="replace").splitlines():
        if f'"{message}"' in line:
            record: dict[str, Any] = json.loads(line)
            if record.get("message") == message:
                return record
    return None


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    report: dict[str, Any] = {}

    def call() -> None:
        load_meanwhile(lambda: (models.whisper(), models.hibari_voice()))
        asyncio.run(asyncio.wait_for(run(workdir, report), CALL_TIMEOUT_S))

    return call_script_main(workdir, report, call)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
