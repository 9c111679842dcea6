"""`callboard demo`: a phone conversation with a voice agent, on one machine, offline.

Starts the embedded server on a free loopback port and a real worker running
examples/receptionist.py (livekit-agents' AgentSession with callboard's offline plugins: silero
VAD, Whisper tiny.en, a scripted LLM, hibari TTS) in zygote-forked job processes. Then it places
calls the way LiveKit's SIP gateway does (room `call-_<number>_<random>`, the caller joining as
`sip_<number>` with kind SIP and the `sip.*` attributes) and the caller speaks: each sentence is
synthesized offline and published with the rtc SDK, the agent hears it, answers by voice, and
the terminal shows the call live (worker state, job phases, the transcript with each turn's
latency). Each call's audio is saved as a stereo WAV (caller left, agent right) and the full
log beside it; a summary ends the demo. Without the voice extra (livekit-agents and the offline
plugins) the call carries tones instead of speech (callboard/demo_tones.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final, TextIO

from livekit import api
from livekit.protocol import agent

from callboard import demo_tones
from callboard.job.context import JobExecutorType
from callboard.log import JsonFormatter
from callboard.server.app import run_server
from callboard.server.config import DEV_API_KEY, DEV_API_SECRET, ConfigError, ServerConfig
from callboard.server.rtc.network import NO_MEDIA_ADDRESS, media_addresses
from callboard.voice_caller import (
    CallEvent,
    SipCaller,
    Synthesize,
    hibari_voice,
    percentile,
    sip_caller_token,
    sip_room_name,
)
from callboard.worker.jobs import ActiveJob
from callboard.worker.options import WorkerOptions
from callboard.worker.worker import Worker

CALLER: Final = "+56975231235"
SCRIPT: Final = (
    "Hi, I'd like to book an appointment for Monday, please.",
    "What time are you open?",
    "That's all, goodbye.",
)
"""What each caller says, one sentence per turn, after the agent's greeting."""
EXAMPLES_DIR: Final = Path(__file__).resolve().parents[1] / "examples"
AGENT_MODULE: Final = "receptionist"
REGISTER_TIMEOUT_S: Final = 120.0
CALL_TIMEOUT_S: Final = 180.0
JOB_END_TIMEOUT_S: Final = 30.0
WATCH_INTERVAL_S: Final = 0.1
ENDED_BY_WORKER: Final = "ended "
ENDED_OK: Final = f"{ENDED_BY_WORKER}JS_SUCCESS"
LOG_FILE: Final = "demo.log"
VOICE_EXTRA: Final = "pip install -e '.[voice]'"


class Screen:
    """What the person running the demo reads: one timestamped line per thing that happened."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.t0 = time.monotonic()

    def line(self, who: str, what: str, text: str) -> None:
        at = time.monotonic() - self.t0
        print(f"{at:6.1f}s  {who:<7} {what:<7} {text}", file=self.out, flush=True)


@dataclass
class CallRecord:
    """One call as the demo saw it: the caller's turns and the job's phases."""

    label: str
    room: str
    caller: SipCaller | None = None
    job: ActiveJob | None = None
    job_id: str = ""
    status: str = ""
    job_error: str = ""
    error: str = ""
    wav: Path | None = None
    heard: dict[str, int] = field(default_factory=dict)
    """Frames of the other side's tone each side heard (the media-only call)."""


class NoVoiceExtra(ConfigError):
    """The demo's voice agent cannot be imported: livekit-agents or the offline plugins are
    missing."""


PlaceCall = Callable[[api.LiveKitAPI, str, CallRecord, "Screen"], Awaitable[None]]


def load_agent() -> ModuleType:
    """examples/receptionist.py, imported by name so that the worker's job processes find it;
    a ConfigError (the CLI prints it) when it or the voice extra is missing."""
    if not (EXAMPLES_DIR / f"{AGENT_MODULE}.py").exists():
        raise ConfigError(
            f"{EXAMPLES_DIR / AGENT_MODULE}.py not found: run the demo from a clone of the "
            "repository installed with pip install -e '.[voice]'"
        )
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        return importlib.import_module(AGENT_MODULE)
    except ImportError as e:
        raise NoVoiceExtra(f"the demo's agent needs the voice extra ({e}): {VOICE_EXTRA}") from e


def log_to_file(path: Path) -> None:
    """Everything logged (worker, job processes, livekit-agents) goes to `path`; the terminal
    keeps warnings only, so that the call reads well."""
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in root.handlers:
        h.setLevel(logging.ERROR)
    root.addHandler(handler)
    root.setLevel(os.environ.get("DEMO_DEBUG", "INFO"))


async def run_demo(calls: int, out_dir: Path | None = None) -> int:
    receptionist: ModuleType | None = None
    missing: BaseException | None = None
    try:
        receptionist = load_agent()
    except NoVoiceExtra as e:
        missing = e.__cause__
    if not media_addresses():
        print(f"demo FAILED: {NO_MEDIA_ADDRESS}", file=sys.stdout)
        return 1
    out = out_dir or Path(tempfile.mkdtemp(prefix="callboard-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    log_to_file(out / LOG_FILE)
    screen = Screen()
    if receptionist is None:
        screen.line(
            "", "demo", f"media only ({missing}): a spoken conversation needs {VOICE_EXTRA}"
        )
        screen.line("", "demo", f"{calls} call(s), tones both ways; log in {out}")
        agent_fns: dict[str, Any] = {"entrypoint_fnc": demo_tones.answer_with_tone}
        place: PlaceCall = _tone_call
    else:
        voice = hibari_voice()  # the callers' voice
        screen.line(
            "", "demo", f"{calls} call(s) to examples/receptionist.py; audio and log in {out}"
        )
        agent_fns = {"entrypoint_fnc": receptionist.entrypoint, "prewarm_fnc": receptionist.prewarm}

        async def place(lk: api.LiveKitAPI, ws_url: str, r: CallRecord, s: Screen) -> None:
            await _call(lk, ws_url, r, s, voice)

    async with run_server(ServerConfig(port=0)) as server:
        screen.line("", "server", f"{server.url}, media on {', '.join(media_addresses())}")
        worker = Worker(
            WorkerOptions(
                **agent_fns,
                job_executor_type=JobExecutorType.PROCESS,
                ws_url=server.url,
                api_key=DEV_API_KEY,
                api_secret=DEV_API_SECRET,
                num_idle_processes=min(calls, 4),
                host="127.0.0.1",
                port=0,
            ),
            devmode=True,
        )
        running = asyncio.create_task(worker.run(), name="demo_worker_task")
        watcher = asyncio.create_task(_watch_worker(worker, screen), name="demo_watch_task")
        try:
            records = await _converse(
                server.url, server.http_url, worker, calls, screen, out, place
            )
        finally:
            await worker.drain(10)
            await worker.aclose()
            await running
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    if receptionist is None:
        return demo_tones.tone_summary(records, screen, ENDED_OK)
    return _summary(records, screen, out)


async def _watch_worker(worker: Worker, screen: Screen) -> None:
    """Print the worker's state when it changes (registration, availability, running jobs)."""
    seen: tuple[object, ...] = ()
    while True:
        now = (worker.registered, worker.state, len(worker.active_jobs))
        if now != seen:
            registered, state, jobs = now
            what = f"{state.value}, {jobs} job(s) running"
            if registered and (not seen or not seen[0]):
                what = f"registered as {worker.id}; {what}"
            screen.line("", "worker", what)
            seen = now
        await asyncio.sleep(WATCH_INTERVAL_S)


async def _converse(
    ws_url: str,
    http_url: str,
    worker: Worker,
    calls: int,
    screen: Screen,
    out: Path,
    place: PlaceCall,
) -> list[CallRecord]:
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while not worker.registered:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not register with the embedded server")
        await asyncio.sleep(WATCH_INTERVAL_S)
    records = [CallRecord(f"call {i + 1}", sip_room_name(CALLER)) for i in range(calls)]
    notes = _AgentNotes(screen, records)
    logging.getLogger("livekit.agents").addHandler(notes)
    async with api.LiveKitAPI(http_url, DEV_API_KEY, DEV_API_SECRET) as lk:
        phases = asyncio.create_task(
            _watch_jobs(lk, worker, records, screen), name="demo_jobs_task"
        )
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(place(lk, ws_url, r, screen), CALL_TIMEOUT_S) for r in records),
            return_exceptions=True,
        )
        for record, outcome in zip(records, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                record.error = f"{type(outcome).__name__}: {outcome}"
                screen.line(record.label, "error", record.error)
            if record.caller is not None:
                record.wav = out / f"{record.room}.wav"
                record.caller.recording.save(record.wav)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(phases), JOB_END_TIMEOUT_S)
        phases.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await phases
    logging.getLogger("livekit.agents").removeHandler(notes)
    return records


async def _call(
    lk: api.LiveKitAPI, ws_url: str, record: CallRecord, screen: Screen, voice: Synthesize
) -> None:
    """One caller: dial in, hear the greeting, say the script, hang up."""

    def show(ev: CallEvent) -> None:
        if ev.kind == "joined":
            screen.line(record.label, "phone", f"sip_{CALLER} dials in (room {ev.text})")
        elif ev.kind == "caller":
            screen.line(record.label, "caller", f"“{ev.text}”")
        elif ev.kind == "agent":
            turn = f"   [turn {ev.latency_s:.2f} s]" if ev.latency_s is not None else ""
            screen.line(record.label, "agent", f"“{ev.text}”{turn}")
        elif ev.kind == "hangup":
            screen.line(record.label, "phone", "hangs up")

    await lk.room.create_room(api.CreateRoomRequest(name=record.room, departure_timeout=1))
    token = sip_caller_token(DEV_API_KEY, DEV_API_SECRET, record.room, CALLER)
    caller = SipCaller(ws_url, token, voice, show)
    record.caller = caller
    await caller.dial()
    try:
        await caller.listen_to_greeting()
        for sentence in SCRIPT:
            await caller.say(sentence)
    finally:
        await caller.hang_up()


async def _tone_call(lk: api.LiveKitAPI, ws_url: str, record: CallRecord, screen: Screen) -> None:
    """One media-only call: the caller dials in as the SIP gateway would and trades tones."""
    await lk.room.create_room(api.CreateRoomRequest(name=record.room, departure_timeout=1))
    token = sip_caller_token(DEV_API_KEY, DEV_API_SECRET, record.room, CALLER)
    await demo_tones.tone_call(ws_url, token, record, screen)


async def _watch_jobs(
    lk: api.LiveKitAPI, worker: Worker, records: list[CallRecord], screen: Screen
) -> None:
    """Print each call's job phases: as the server records them while the room lives, and the
    outcome the worker reported when the job ended. Returns once every job has ended."""
    while not all(r.status.startswith(ENDED_BY_WORKER) for r in records):
        for r in records:
            active = next((j for j in worker.active_jobs if j.info.job.room.name == r.room), None)
            r.job = active or r.job
            if r.job is not None:
                r.job_id = r.job.info.job.id
            if r.job is not None and r.job.outcome is not None:
                if not r.status.startswith(ENDED_BY_WORKER):
                    r.status = f"{ENDED_BY_WORKER}{r.job.outcome.status_name}"
                    r.job_error = r.job.outcome.error
                    screen.line(r.label, "job", f"{r.job_id} {r.status} (reported by the worker)")
                continue
            with contextlib.suppress(api.TwirpError):
                for d in await lk.agent_dispatch.list_dispatch(r.room):
                    for job in d.state.jobs:
                        status = agent.JobStatus.Name(job.state.status).removeprefix("JS_")
                        if (job.id, status) != (r.job_id, r.status):
                            r.job_id, r.status = job.id, status
                            screen.line(r.label, "job", f"{job.id} {status.lower()}")
        await asyncio.sleep(WATCH_INTERVAL_S)


class _AgentNotes(logging.Handler):
    """Shows the livekit-agents log lines that tell the story of a call (relayed from the job
    processes with their room) on the screen."""

    NOTES: Final = {
        "closing agent session due to participant disconnect": "hears the hang-up: session closed",
    }

    def __init__(self, screen: Screen, records: list[CallRecord]) -> None:
        super().__init__(logging.INFO)
        self.screen = screen
        self.labels = {r.room: r.label for r in records}

    def emit(self, record: logging.LogRecord) -> None:
        label = self.labels.get(str(getattr(record, "room", "")))
        message = record.getMessage()
        for start, note in self.NOTES.items():
            if label and message.startswith(start):
                self.screen.line(label, "agent", note)


def _summary(records: list[CallRecord], screen: Screen, out: Path) -> int:
    print("", file=screen.out)
    print("summary", file=screen.out)
    latencies: list[float] = []
    ok = True
    for r in records:
        turns = r.caller.turns if r.caller else []
        lat = [t.latency_s for t in turns if t.latency_s is not None]
        latencies += lat
        spoke = bool(turns) and all(t.heard_by_agent and t.agent_said for t in turns)
        ended = r.status == ENDED_OK
        good = not r.error and ended and spoke and len(turns) == len(SCRIPT)
        ok = ok and good
        line = f"  {r.label}: {len(turns)} turn(s), job {r.job_id or '-'} {r.status or 'no status'}"
        if lat:
            line += f", turn latency {statistics.median(lat):.2f} s median, {max(lat):.2f} s max"
        if r.error or r.job_error:
            line += f" ({r.error or r.job_error})"
        print(line, file=screen.out)
        if r.wav is not None:
            print(f"    audio: {r.wav}", file=screen.out)
    if latencies:
        p95 = percentile(latencies, 95)
        print(
            f"  turn latency (caller's end of speech → first agent audio): "
            f"p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s over {len(latencies)}",
            file=screen.out,
        )
    print(f"  log: {out / LOG_FILE}", file=screen.out)
    verdict = "passed" if ok else "FAILED"
    print(
        f"demo {verdict}: {len(records)} call(s), each a spoken conversation with the agent",
        file=screen.out,
    )
    return 0 if ok else 1
