"""Simulated phone callers in processes of their own, driven by bench/voice.py over pipes, so
that the bench process only orchestrates: six rtc SDK callers in one Python process on 2 cores
lost their signal connections ("ping timeout") and heard no greeting, their Rust runtime
waiting on a busy interpreter.

One process, `python -m bench.caller_process VOICE_JSON`, holds any number of calls at once.
VOICE_JSON maps each sentence a caller may say to a file of its speech (int16 mono PCM) and
its rate, synthesized once by the bench. stdin takes JSON lines, one command each:

    {"call": ID, "dial": {"ws_url": ..., "token": ..., "says": [sentence, ...]}}
    {"call": ID, "listen": S}        # the agent was dispatched: hear its greeting within S s
    {"call": ID, "hang_up": true}    # give up on the call

and stdout gives JSON lines, one event each, every time in `time.monotonic()` seconds (one
clock for every process of the machine):

    {"call": ID, "step": "dialled" | "agent joined" | "greeted", "at": t}
    {"call": ID, "step": "ended", "latencies": [s, ...], "error": str | null, "steps": {...}}

A call with nothing to say holds the line after the greeting until it is hung up.

A turn is measured by callboard.voice_caller.SipCaller exactly as in the bench process: the
caller's end of speech to the first voiced 10 ms of the agent's answer at the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import psutil
from livekit import rtc

from callboard.voice_caller import REPLY_TIMEOUT_S, SipCaller, Synthesize

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
AGENT_IDENTITY_PREFIX: Final = "agent-"
HUNG_UP: Final = "hung up by the bench"

Emit = Callable[[dict[str, Any]], None]


def recorded_voice(spec_path: Path) -> Synthesize:
    """A voice that says only the sentences the bench synthesized for it."""
    spec = json.loads(spec_path.read_text())
    speech = {s: (Path(f).read_bytes(), int(rate)) for s, (f, rate) in spec.items()}

    def synthesize(sentence: str) -> tuple[bytes, int]:
        return speech[sentence]

    return synthesize


def ended_event(
    call_id: str, latencies: list[float], error: str | None, steps: dict[str, float]
) -> dict[str, Any]:
    return {
        "call": call_id,
        "step": "ended",
        "latencies": latencies,
        "error": error,
        "steps": steps,
    }


class Call:
    """One caller's call, step by step as the bench commands it."""

    def __init__(self, call_id: str, dial: dict[str, Any], voice: Synthesize, emit: Emit):
        self.id = call_id
        self.caller = SipCaller(dial["ws_url"], dial["token"], voice)
        self.says: list[str] = list(dial["says"])
        self.emit = emit
        self.listen = asyncio.Event()
        self.greeting_timeout_s = REPLY_TIMEOUT_S
        self.steps: dict[str, float] = {"dial": time.monotonic()}

        @self.caller.room.on("participant_connected")
        def joined(p: rtc.RemoteParticipant) -> None:
            if p.identity.startswith(AGENT_IDENTITY_PREFIX):
                self.mark("agent joined")

    def mark(self, step: str) -> None:
        if step not in self.steps:
            self.steps[step] = time.monotonic()
            self.emit({"call": self.id, "step": step, "at": self.steps[step]})

    async def run(self) -> None:
        latencies: list[float] = []
        error: str | None = None
        try:
            await self.caller.dial()
            self.mark("dialled")
            await self.listen.wait()
            await self.caller.listen_to_greeting(self.greeting_timeout_s)
            self.mark("greeted")
            for sentence in self.says:
                turn = await self.caller.say(sentence)
                if turn.latency_s is not None:
                    latencies.append(turn.latency_s)
            if not self.says:
                await asyncio.Event().wait()  # until hung up
        except asyncio.CancelledError:
            error = HUNG_UP
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            self.heard()
            with contextlib.suppress(Exception):
                await self.caller.hang_up()
            self.emit(ended_event(self.id, latencies, error, self.steps))

    def heard(self) -> None:
        """The first 10 ms of the agent's audio at the caller, and the first voiced."""
        ear = self.caller.ear
        if ear.frames:
            self.steps["first audio"] = ear.frames[0][0]
        if ear.voiced:
            self.steps["first voiced"] = ear.voiced[0]


async def serve(voice: Synthesize, commands: Callable[[], Awaitable[bytes]], emit: Emit) -> None:
    """Run calls as commanded until the commands end; then hang up whatever still runs."""
    calls: dict[str, Call] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        while line := await commands():
            cmd = json.loads(line)
            call_id = str(cmd["call"])
            if "dial" in cmd:
                calls[call_id] = Call(call_id, cmd["dial"], voice, emit)
                tasks[call_id] = asyncio.create_task(calls[call_id].run())
            elif cmd.get("listen") and call_id in calls:
                calls[call_id].greeting_timeout_s = float(cmd["listen"])
                calls[call_id].listen.set()
            elif cmd.get("hang_up") and call_id in tasks:
                tasks[call_id].cancel()
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def main_async(spec_path: Path) -> None:
    voice = recorded_voice(spec_path)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    await serve(voice, reader.readline, emit)


def main(argv: list[str]) -> int:
    asyncio.run(main_async(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# -- the bench's half -----------------------------------------------------------------------

HANG_UP_WAIT_S: Final = 15.0
"""How long a call may take to hang up once told to (it leaves its room first)."""


class CallFailed(RuntimeError):
    """A call ended before reaching the step awaited: its caller's error."""


class RemoteCall:
    """A call held by a caller process, seen from the bench: its steps as they come."""

    def __init__(self, call_id: str, proc: CallerProcess) -> None:
        self.id = call_id
        self.proc = proc
        self.steps: dict[str, float] = {}
        self.result: dict[str, Any] | None = None
        self._changed = asyncio.Event()

    def on_event(self, event: dict[str, Any]) -> None:
        if event["step"] == "ended":
            self.result = event
            self.steps = {**event["steps"], **self.steps}
        else:
            self.steps.setdefault(event["step"], float(event["at"]))
        self._changed.set()

    def mark(self, step: str) -> None:
        """A step the bench took itself (e.g. "dispatched")."""
        self.steps.setdefault(step, time.monotonic())

    async def step(self, name: str) -> None:
        """Until the caller reached step `name`; CallFailed if its call ended first."""
        while name not in self.steps:
            if self.result is not None:
                raise CallFailed(self.result["error"] or f"the call ended before {name!r}")
            self._changed.clear()
            await self._changed.wait()

    async def ended(self) -> list[float]:
        """The call's turn latencies once it ended; CallFailed with its error if it failed."""
        while self.result is None:
            self._changed.clear()
            await self._changed.wait()
        if self.result["error"]:
            raise CallFailed(self.result["error"])
        return [float(x) for x in self.result["latencies"]]

    def listen(self, greeting_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        """The agent was dispatched: the caller waits for its greeting, at most this long."""
        self.proc.send({"call": self.id, "listen": greeting_timeout_s})

    async def hang_up(self) -> None:
        """Tell the caller to hang up (if its call still runs) and wait until it did."""
        if self.result is None:
            self.proc.send({"call": self.id, "hang_up": True})
            with contextlib.suppress(TimeoutError, CallFailed):
                async with asyncio.timeout(HANG_UP_WAIT_S):
                    await self.ended()


class CallerProcess:
    """One `python -m bench.caller_process` and the calls it holds."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.calls: dict[str, RemoteCall] = {}
        self._reader = asyncio.create_task(self._read())

    @property
    def in_progress(self) -> int:
        return sum(c.result is None for c in self.calls.values())

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError, KeyError):
                event = json.loads(line)
                self.calls[str(event["call"])].on_event(event)
        for call in self.calls.values():  # the process exited: its calls with it
            if call.result is None:
                call.on_event(
                    {
                        "step": "ended",
                        "latencies": [],
                        "error": "caller process exited",
                        "steps": {},
                    }
                )

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(HANG_UP_WAIT_S):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


class CallerProcesses:
    """`count` caller processes started once; each new call goes to the one holding fewest."""

    def __init__(self, count: int, voice: Synthesize, says: Sequence[str], workdir: Path):
        self.count = count
        self.workdir = workdir / "callers"
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec = {}
        for i, sentence in enumerate(says):
            pcm, rate = voice(sentence)
            path = self.workdir / f"say-{i}.pcm"
            path.write_bytes(pcm)
            spec[sentence] = (str(path), rate)
        self.spec_path = self.workdir / "voice.json"
        self.spec_path.write_text(json.dumps(spec))
        self.procs: list[CallerProcess] = []
        self._calls = 0

    async def start(self) -> None:
        for i in range(self.count):
            with self._log(i) as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.caller_process",
                    str(self.spec_path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    cwd=REPO_ROOT,
                )
            self.procs.append(CallerProcess(proc))

    def _log(self, i: int) -> IO[bytes]:
        """Where caller process `i` writes its stderr (the rtc SDK's warnings)."""
        return open(self.workdir / f"caller-{i}.log", "wb")

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(p.proc.pid))
        return out

    def set_nice(self, niceness: int) -> None:
        """Every thread of every caller process at this niceness (Linux: a thread's own; root
        may lower it again)."""
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                for thread in p.threads():
                    with contextlib.suppress(ProcessLookupError):
                        os.setpriority(os.PRIO_PROCESS, thread.id, niceness)

    def dial(self, ws_url: str, token: str, says: Sequence[str]) -> RemoteCall:
        """Start a call: its caller dials in at once, and waits for `listen()`."""
        self._calls += 1
        proc = min(self.procs, key=lambda p: p.in_progress)
        call = RemoteCall(str(self._calls), proc)
        proc.calls[call.id] = call
        call.mark("dial")
        proc.send({"call": call.id, "dial": {"ws_url": ws_url, "token": token, "says": says}})
        return call

    async def aclose(self) -> None:
        await asyncio.gather(*(p.close() for p in self.procs), return_exceptions=True)
