"""Debian's sipp (package sip-tester) as the phone: scenarios written for each test, run as a
subprocess on loopback, bounded in time, with its exit code and error log kept."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from callboard.server.sip.codecs import PCMU
from tests.interop.livekit_server import HOST, free_port

SIPP_MISSING: Final = "sipp is not installed: apt-get install sip-tester"
CALLER: Final = "+56975231235"
CALLED: Final = "+15550100"
RUN_TIMEOUT_S: Final = 15.0

INVITE_HEADERS: Final = """\
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      Contact: <sip:{caller}@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70"""
SDP: Final = """\
      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 8 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:8 PCMA/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-16"""


def invite(caller: str = CALLER, extra: str = "", sdp: str = SDP) -> str:
    headers = INVITE_HEADERS.format(caller=caller)
    extra_lines = f"\n      {extra}" if extra else ""
    return f"""  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
{headers}
      CSeq: [cseq] INVITE{extra_lines}
      Content-Type: application/sdp
      Content-Length: [len]

{sdp}
    ]]>
  </send>
"""


def in_dialog(method: str, caller: str = CALLER, cseq: str = "[cseq]", retrans: bool = True) -> str:
    retransmit = ' retrans="500"' if retrans else ""
    return f"""  <send{retransmit}>
    <![CDATA[
      {method} [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} {method}
      Contact: <sip:{caller}@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


def answered(sdp: str = SDP, timeout_ms: int = 0) -> str:
    """INVITE (with `sdp`), its 100 and 180 if they come, the 200 OK, our ACK."""
    timeout = f' timeout="{timeout_ms}"' if timeout_ms else ""
    steps = invite(sdp=sdp)
    steps += '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="180" optional="true"/>\n'
    steps += f'  <recv response="200" rrs="true"{timeout}/>\n'
    return steps + in_dialog("ACK", cseq="[cseq]", retrans=False)


def scenario(name: str, body: str) -> str:
    head = '<?xml version="1.0" encoding="ISO-8859-1" ?>'
    return f'{head}\n<scenario name="{name}">\n{body}</scenario>\n'


def answered_call(audio: str = "", dtmf: str = "", talk_ms: int = 1500, auth: bool = False) -> str:
    """INVITE (answering a 407 first when `auth`), 200, ACK, stream `audio`, send `dtmf`
    digits, BYE, 200."""
    steps = invite()
    steps += '  <recv response="100" optional="true"/>\n'
    if auth:
        steps += '  <recv response="407" auth="true"/>\n'
        steps += ack_for_error()
        steps += invite(extra="[authentication]")
        steps += '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="180" optional="true"/>\n'
    steps += '  <recv response="200" rrs="true"/>\n'
    steps += in_dialog("ACK", cseq="[cseq]", retrans=False)
    actions = []
    if audio:
        actions.append(f'<exec rtp_stream="{audio},1,0"/>')
    if dtmf:
        actions.append(f'<exec play_dtmf="{dtmf}"/>')
    if actions:
        steps += f"  <nop><action>{''.join(actions)}</action></nop>\n"
    steps += f'  <pause milliseconds="{talk_ms}"/>\n'
    steps += in_dialog("BYE")
    steps += '  <recv response="200"/>\n'
    return scenario("answered call", steps)


STEP_TIMEOUT_MS: Final = 120_000
CALL_ID_FORMAT: Final = "agentcall-%u@%s"
"""sipp's `-cid_str` for a paced call: call 1 from 127.0.0.1 is `agentcall-1@127.0.0.1`."""


def paced_call(media_port: int, steps: list[str]) -> str:
    """A call whose phone media address is `media_port` (a socket the test owns, offering PCMU
    and telephone-event only) and which the test paces: after the ACK, each of `steps` (sipp
    actions, e.g. `<exec play_pcap_audio="x.pcap"/>`) runs when the test sends the call a
    NOTIFY (`notify_sipp`); one more NOTIFY makes the phone hang up (BYE)."""
    offer = SDP.replace("[media_port]", str(media_port)).replace(" 0 8 101", " 0 101")
    offer = offer.replace("      a=rtpmap:8 PCMA/8000\n", "")
    body = answered(offer, STEP_TIMEOUT_MS)
    for action in [*steps, ""]:
        body += f'  <recv request="NOTIFY" timeout="{STEP_TIMEOUT_MS}"/>\n'
        body += _answer("200 OK")
        if action:
            body += f"  <nop><action>{action}</action></nop>\n"
    body += in_dialog("BYE")
    body += '  <recv response="200"/>\n'
    return scenario("paced call", body)


def pin_call(media_port: int, digits_pcap: Path, admitted: bool) -> str:
    """Answered at once; after the prompt the phone types the digits in `digits_pcap`. When
    `admitted` it then talks for a second and hangs up, else it waits for the gateway's BYE."""
    offer = SDP.replace("[media_port]", str(media_port))
    body = answered(offer)
    body += '  <pause milliseconds="500"/>\n'
    body += f'  <nop><action><exec play_pcap_audio="{digits_pcap}"/></action></nop>\n'
    if admitted:
        body += '  <pause milliseconds="1000"/>\n'
        body += in_dialog("BYE")
        body += '  <recv response="200"/>\n'
    else:
        body += '  <recv request="BYE" timeout="10000"/>\n'
        body += _answer("200 OK")
    return scenario("pin call", body)


def notify_sipp(sipp_port: int, step: int, call_id: str = "agentcall-1@127.0.0.1") -> None:
    """Tell the paced call in sipp on `sipp_port` to take its next step."""
    request = (
        f"NOTIFY sip:{CALLER}@{HOST}:{sipp_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:9;branch=z9hG4bK-step-{step}\r\n"
        f"From: <sip:test@{HOST}>;tag=test\r\n"
        f"To: <sip:{CALLER}@{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {step} NOTIFY\r\n"
        "Event: callboard-test-step\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(request.encode(), (HOST, sipp_port))


def ack_for_error() -> str:
    return """  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: [cseq] ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


def refused_call(status: int) -> str:
    """An INVITE answered `status` (after optional 100/180), then the ACK for it."""
    steps = invite()
    steps += '  <recv response="100" optional="true"/>\n'
    steps += '  <recv response="180" optional="true"/>\n'
    steps += f'  <recv response="{status}"/>\n'
    steps += ack_for_error()
    return scenario(f"refused {status}", steps)


def write_ulaw_wav(path: Path, pcm: np.ndarray) -> Path:
    """A mono 8 kHz G.711 µ-law WAV (format tag 7), what sipp's rtp_stream sends as is."""
    data = PCMU.encode(pcm.astype(np.int16))
    fmt = struct.pack("<HHIIHHH", 7, 1, 8000, 8000, 1, 8, 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"fact" + struct.pack("<II", 4, len(data))
    chunks += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
    return path


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@dataclass
class SippRun:
    returncode: int
    output: str
    errors: str


async def run_sipp(
    work: Path,
    xml: str,
    sip_port: int | None,
    *,
    listen_port: int | None = None,
    calls: int = 1,
    rate: float = 1.0,
    transport: str = "u1",
    service: str = CALLED,
    auth: tuple[str, str] | None = None,
    timeout: float = RUN_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> SippRun:
    """Run one scenario against 127.0.0.1:`sip_port` (or, with `sip_port` None, wait for calls
    on `listen_port`); sipp exits 0 when every call passed."""
    sipp = shutil.which("sipp")
    if sipp is None:
        raise FileNotFoundError(SIPP_MISSING)
    scenario_file = _write(work, xml)
    args = [
        sipp,
        *([f"{HOST}:{sip_port}"] if sip_port is not None else []),
        "-sf",
        str(scenario_file),
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-i",
        HOST,
        "-p",
        str(listen_port or free_port()),
        "-mi",
        HOST,
        "-mp",
        str(free_port(socket.SOCK_DGRAM)),
        "-s",
        service,
        "-t",
        transport,
        "-nostdin",
        "-timeout",
        f"{int(timeout)}s",
        "-timeout_error",
        "-trace_err",
        "-error_file",
        str(work / "errors.log"),
    ]
    if auth is not None:
        args += ["-au", auth[0], "-ap", auth[1]]
    args += extra_args
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=work,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout + 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    errors = _read_errors(work)
    return SippRun(proc.returncode or 0, out.decode(errors="replace")[-3000:], errors[-3000:])


def _write(work: Path, xml: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "scenario.xml"
    path.write_text(xml)
    return path


def _read_errors(work: Path) -> str:
    path = work / "errors.log"
    return path.read_text(errors="replace") if path.exists() else ""


def answering_phone(hang_up_after_ms: int = 1000, ring_ms: int = 0) -> str:
    """A UAS: answers an INVITE (180, `ring_ms` of ringing, 200 with SDP), takes the ACK, hangs
    up after a while."""
    return scenario(
        "answering phone",
        f"""  <recv request="INVITE" crlf="true" rrs="true">
    <action>
      <ereg regexp=".*" search_in="hdr" header="From:" check_it="true" assign_to="caller"/>
    </action>
  </recv>
{_uas_response("180 Ringing")}  <pause milliseconds="{ring_ms}"/>
{_uas_response("200 OK", SDP)}\
  <recv request="ACK" rtd="true" crlf="true"/>
  <pause milliseconds="{hang_up_after_ms}"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:callee@[local_ip]:[local_port]>;tag=[pid]SIPpTag01[call_number]
      To: [$caller]
      [last_Call-ID:]
      CSeq: 1 BYE
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
""",
    )


def _uas_response(status: str, sdp: str = "") -> str:
    """An answer to the INVITE, with our tag (and an SDP body)."""
    body = (
        f"Content-Type: application/sdp\n      Content-Length: [len]\n\n{sdp}"
        if sdp
        else ("Content-Length: 0\n")
    )
    retrans = ' retrans="500"' if status.startswith("2") else ""
    return f"""  <send{retrans}>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      {body}
    ]]>
  </send>
"""


def transferred_call() -> str:
    """A caller who is answered, then REFERred elsewhere (202), then hung up on (BYE → 200)."""
    steps = answered()
    steps += '  <recv request="REFER" timeout="10000"/>\n'
    steps += _answer("202 Accepted")
    steps += '  <recv request="BYE" timeout="10000"/>\n'
    steps += _answer("200 OK")
    return scenario("transferred call", steps)


def _answer(status: str) -> str:
    return f"""  <send>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
"""


def cancel() -> str:
    """CANCEL the INVITE just sent (same branch and CSeq number, RFC 3261 §9.1)."""
    return """  <send>
    <![CDATA[
      CANCEL sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      [last_Call-ID:]
      CSeq: [cseq] CANCEL
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""
