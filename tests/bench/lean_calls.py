"""Calls of bench.media's lean participants against one server, run by
tests/bench/test_lean_participant.py as `python -m tests.bench.lean_calls WORKDIR KIND`.

The process moves into a private network namespace (tests/interop/netns.py), starts the server
KIND, and holds `CALLS` calls whose two sides join, then publish at the same moment (so a
side's subscriber connection is renegotiated while its first DTLS handshake may still run),
replay `SECONDS` of Opus and count what they receive. report.json holds each side's packets
sent and received and the mouth-to-ear latencies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Final

from bench.lean_participant import LeanParticipant, Pacer, encode_voice
from bench.media import IN_FLIGHT_S, latencies, token
from tests.interop.livekit_server import start_server, stop_process
from tests.interop.media_call import REPORT_FILE, SKIP_EXIT
from tests.interop.netns import MEDIA_IP, NetnsUnavailable, enter_private_network

CALLS: Final = 6
SECONDS: Final = 1.5


async def hold_calls(url: str, report: dict[str, Any]) -> None:
    voice = encode_voice(dtx=True)
    pairs = [
        (
            LeanParticipant(url, token("caller", f"lean-{i}"), voice),
            LeanParticipant(url, token("agent", f"lean-{i}"), voice),
        )
        for i in range(CALLS)
    ]
    sides = [s for pair in pairs for s in pair]
    try:
        for caller, agent in pairs:
            await asyncio.gather(caller.connect(), agent.connect())
            await asyncio.gather(caller.publish(), agent.publish())
        await asyncio.gather(*(s.subscribed() for s in sides))
        await Pacer(sides).run(SECONDS)
        await asyncio.sleep(IN_FLIGHT_S)
        report["sides"] = [
            {"sent": s.packets_sent, "received": s.ear.packets, "closed": s.closed} for s in sides
        ]
        report["latencies"] = [
            x
            for caller, agent in pairs
            for x in latencies(caller.sent_onsets, agent.ear.onsets)
            + latencies(agent.sent_onsets, caller.ear.onsets)
        ]
        report["bursts_sent"] = sum(len(s.sent_onsets) for s in sides)
        report["bursts_heard"] = sum(len(s.ear.onsets) for s in sides)
    finally:
        await asyncio.gather(*(s.aclose() for s in sides), return_exceptions=True)


def main(argv: list[str]) -> int:
    workdir, kind = Path(argv[1]), argv[2]
    report: dict[str, Any] = {"skip": None, "error": None, "kind": kind}
    try:
        enter_private_network()
    except NetnsUnavailable as e:
        report["skip"] = str(e)
        (workdir / REPORT_FILE).write_text(json.dumps(report))
        return SKIP_EXIT
    warnings.filterwarnings("ignore", message="The HMAC key is")  # the public dev key pair
    code = 0
    try:
        server = start_server(kind, workdir, media_ip=MEDIA_IP)
        report["server_log"] = str(server.log_path)
        try:
            asyncio.run(hold_calls(server.ws_url, report))
        finally:
            stop_process(server.proc)
    except BaseException as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        code = 1
    (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
