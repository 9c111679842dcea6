"""A phone in a terminal (`callboard call`): dials any SIP address over UDP, plays audio to the
callee, records what comes back, sends DTMF, hangs up; the far end may hang up first."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from callboard.server.sip import sdp
from callboard.server.sip.audio import read_wav, write_wav
from callboard.server.sip.codecs import FRAME_SAMPLES, Pcm
from callboard.server.sip.media import FRAME_S, RtpSession
from callboard.server.sip.message import SipMessage, reply
from callboard.server.sip.transport import Peer, SipTransports
from callboard.server.sip.uac import ClientTransactions, DialTarget, OutgoingDialog

SPEECH_LEVEL: Final = 500
"""Mean absolute sample above which a 20 ms frame counts as sound rather than silence."""
VOICED_RMS: Final = 300.0
"""A 20 ms frame louder than this (RMS) is speech."""
QUIET_FRAMES: Final = 60
"""1.2 s of quiet (20 ms frames) ends an utterance."""
GREETING_WAIT_S: Final = 15.0
UTTERANCE_POLL_S: Final = 0.1


def rms(frame: Pcm) -> float:
    return float(np.sqrt(np.mean(frame.astype(np.float64) ** 2)))


def utterance(heard: list[Pcm], since: int) -> tuple[int, int] | None:
    """(first, end) frame indices of the first thing said at or after frame `since`, once
    QUIET_FRAMES of quiet followed it; None until then."""
    levels = [0.0] * since + [rms(frame) for frame in heard[since:]]
    return utterance_in(levels, since)


def utterance_in(levels: list[float], since: int) -> tuple[int, int] | None:
    """`utterance` over the frames' RMS levels (a caller polling a growing call keeps them)."""
    loud = np.flatnonzero(np.asarray(levels[since:]) > VOICED_RMS) + since
    if not loud.size or len(levels) - loud[-1] < QUIET_FRAMES:
        return None
    pauses = np.flatnonzero(np.diff(loud) > QUIET_FRAMES)
    end = loud[pauses[0]] if pauses.size else loud[-1]
    return int(loud[0]), int(end) + 1


Say = Callable[[str], None]


@dataclass
class CallResult:
    """How a call went: the final answer to the INVITE, and what was heard."""

    status: int
    reason: str
    codec: str = ""
    heard: list[Pcm] = field(default_factory=list)
    hung_up_by_callee: bool = False
    sent: int = 0
    """RTP packets sent to the callee."""
    lost: int = 0
    """Packets from the callee that never arrived (sequence gaps)."""

    @property
    def audio(self) -> Pcm:
        return np.concatenate(self.heard) if self.heard else np.zeros(0, dtype=np.int16)

    @property
    def sound_seconds(self) -> float:
        """Seconds of received frames louder than silence."""
        loud = [f for f in self.heard if np.abs(f.astype(np.int32)).mean() > SPEECH_LEVEL]
        return len(loud) * FRAME_S


class SipPhone:
    """One UDP SIP endpoint on `host` (a free port) that places calls."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.client = ClientTransactions()
        self.transports = SipTransports(host, 0, self._on_message, lambda *_: None)
        self._hangup = asyncio.Event()

    async def __aenter__(self) -> SipPhone:
        await self.transports.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transports.aclose()

    def _on_message(self, msg: SipMessage, peer: Peer) -> None:
        if not msg.is_request:
            self.client.on_response(msg)
            return
        if msg.method == "ACK":
            return
        if msg.method == "BYE":
            self._hangup.set()
        peer.send(reply(msg, 200 if msg.method in ("BYE", "OPTIONS", "INFO") else 405).encode())

    async def dial(self, target: DialTarget, say: Say = lambda _: None) -> ActiveCall:
        """Dial `target`; the call is answered when `ActiveCall.result.status` is 2xx (else it
        is already over)."""
        heard: list[Pcm] = []
        digits: list[str] = []

        def digit(d: str) -> None:
            digits.append(d)
            say(f"received DTMF {d}")

        media = RtpSession(heard.append, digit)
        port = await media.open(self.host)
        self._hangup.clear()
        dialog = OutgoingDialog(
            target,
            self.client,
            lambda data: self.transports.send_udp(data, target.host, target.port),
            (self.host, self.transports.port),
        )
        say(f"calling sip:{target.to_user}@{target.host}:{target.port}")

        def progress(response: SipMessage) -> None:
            if response.status in (180, 183):
                say(f"{response.status} {response.reason}")

        call = ActiveCall(dialog, media, self._hangup, digits)
        response = await dialog.invite(sdp.offer(self.host, port), progress)
        call.result = CallResult(response.status, response.reason, heard=heard)
        if not 200 <= response.status < 300:
            media.close()
            return call
        remote = sdp.parse(response.body)
        answer = sdp.choose(remote, self.host, port)
        call.result.codec = answer.codec
        say(f"answered ({answer.codec})")
        media.start(answer, (remote.address, remote.port))
        return call

    async def call(
        self,
        target: DialTarget,
        audio: Pcm,
        *,
        listen: float,
        dtmf: str = "",
        say: Say = lambda _: None,
        wait_greeting: bool = False,
    ) -> CallResult:
        """Dial `target`, (let the other side greet first,) play `audio`, keep listening
        `listen` s after it, then hang up."""
        call = await self.dial(target, say)
        if not call.answered:
            return call.result
        if wait_greeting:
            greeting = await call.wait_utterance(0, GREETING_WAIT_S)
            if greeting is not None:
                say(f"heard a greeting of {(greeting[1] - greeting[0]) * FRAME_S:.1f} s")
        call.media.play(audio)
        for digit in dtmf:
            call.media.send_digit(digit)
        await call.wait_hangup(len(audio) / FRAME_SAMPLES * FRAME_S + listen)
        return await call.hang_up()


class ActiveCall:
    """A call this phone placed: its media, what it heard, and how it ends."""

    def __init__(
        self,
        dialog: OutgoingDialog,
        media: RtpSession,
        hung_up: asyncio.Event,
        digits: list[str],
    ) -> None:
        self.dialog = dialog
        self.media = media
        self.hung_up = hung_up
        self.digits = digits
        self.result = CallResult(0, "")
        self._levels: list[float] = []
        """RMS of each heard frame so far, computed once."""

    @property
    def answered(self) -> bool:
        return 200 <= self.result.status < 300

    async def wait_utterance(self, since: int, timeout: float) -> tuple[int, int] | None:
        """The frames of the next thing the other side says (after frame `since`), once it
        has finished; None if nothing was said within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        heard = self.result.heard
        while loop.time() < deadline and not self.hung_up.is_set():
            self._levels.extend(rms(frame) for frame in heard[len(self._levels) :])
            found = utterance_in(self._levels, since)
            if found is not None:
                return found
            await asyncio.sleep(UTTERANCE_POLL_S)
        return None

    async def wait_hangup(self, timeout: float) -> bool:
        """Whether the other side hung up within `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hung_up.wait(), timeout)
        return self.hung_up.is_set()

    async def hang_up(self) -> CallResult:
        """BYE (unless the other side hung up first); the media stops."""
        result = self.result
        result.hung_up_by_callee = self.hung_up.is_set()
        try:
            if not result.hung_up_by_callee:
                await self.dialog.bye()
        finally:
            self.media.close()
        result.sent, result.lost = self.media.sent, self.media.lost
        return result


DEFAULT_ADDRESS: Final = "127.0.0.1:5060"
SPEECH_RATE: Final = 8000


class CallOptionsError(ValueError):
    """A bad `callboard call` option; the message names it."""


@dataclass(frozen=True)
class CallOptions:
    """What `callboard call` was asked to do."""

    address: str = DEFAULT_ADDRESS
    """host:port of the SIP server (the embedded gateway by default)."""
    to: str = "+15550100"
    caller: str = "+56975231235"
    wav: Path | None = None
    say: str = ""
    """Text spoken with espeak-ng when no WAV is given."""
    save: Path | None = None
    listen: float = 5.0
    dtmf: str = ""
    username: str = ""
    password: str = ""
    wait_greeting: bool = True
    """Let the other side say its greeting before speaking (up to 15 s)."""

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CallOptionsError(f"address must be host:port, got {self.address!r}")
        if self.wav is None and not self.say:
            raise CallOptionsError("give --wav FILE or --say TEXT")
        if self.listen < 0:
            raise CallOptionsError("--listen must be >= 0")
        if any(d not in "0123456789*#ABCDabcd" for d in self.dtmf):
            raise CallOptionsError(f"--dtmf takes digits 0-9 * # A-D, got {self.dtmf!r}")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)


def speech(options: CallOptions) -> Pcm:
    """The audio to play: the WAV file, or `say` spoken by espeak-ng, at 8 kHz."""
    if options.wav is not None:
        return read_wav(options.wav, SPEECH_RATE)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise CallOptionsError("--say needs espeak-ng (apt-get install espeak-ng); or use --wav")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "say.wav"
        subprocess.run([espeak, "-w", str(out), options.say], check=True, timeout=30)
        return read_wav(out, SPEECH_RATE)


async def run_call(options: CallOptions, say: Say = print) -> int:
    """Place the call; 0 when it was answered, 1 otherwise."""
    audio = speech(options)
    host, port = options.host_port
    target = DialTarget(
        host=host,
        port=port,
        to_user=options.to,
        from_user=options.caller,
        username=options.username,
        password=options.password,
    )
    local = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    async with SipPhone(local) as phone:
        result = await phone.call(target, audio, listen=options.listen, dtmf=options.dtmf, say=say)
    if not 200 <= result.status < 300:
        say(f"call failed: {result.status} {result.reason}")
        return 1
    heard = len(result.audio) / SPEECH_RATE
    say(
        f"sent {len(audio) / SPEECH_RATE:.1f} s; heard {heard:.1f} s "
        f"({result.sound_seconds:.1f} s of it above silence)"
    )
    say("the other side hung up" if result.hung_up_by_callee else "hung up")
    if options.save is not None:
        write_wav(options.save, result.audio, SPEECH_RATE)
        say(f"saved what was heard to {options.save}")
    return 0
