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
import sys
from pathlib import Path
from typing import Any, Final

from bench.lean_participant import LeanParticipant, Pacer, encode_voice
from bench.media import IN_FLIGHT_S, latencies, token
from tests.interop.call_process import against_server, call_script_main
from tests.interop.livekit_server import ServerProcess

CALLS: Final = 6
SECONDS: Final = 1.5
CALLS_TIMEOUT_S: Final = 40.0


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
    report: dict[str, Any] = {"kind": kind}

    async def calls(server: ServerProcess) -> None:
        await hold_calls(server.ws_url, report)

    def run() -> None:
        against_server(kind, workdir, report, calls, CALLS_TIMEOUT_S)

    return call_script_main(workdir, report, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
