"""examples/receptionist.py answering phone calls under callboard's worker, with what its job
sees of the call recorded as JSON lines in PHONE_AGENT_REPORT (the job, DTMF digits).

    python tests/server/sip/agents/phone_receptionist.py start
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from livekit import rtc

from callboard import JobContext, WorkerOptions, cli

REPORT_ENV: Final = "PHONE_AGENT_REPORT"
INITIALIZE_TIMEOUT_S: Final = 60.0
EXAMPLE: Final = Path(__file__).resolve().parents[4] / "examples" / "receptionist.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("receptionist", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["receptionist"] = module
    spec.loader.exec_module(module)
    return module


receptionist = load_example()


def record(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "time": time.time(), **fields})
    with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as f:
        f.write(line + "\n")


def recorded_session(proc: Any) -> Any:
    """The example's session, with what it hears and says recorded."""
    session = new_session(proc)

    @session.on("user_input_transcribed")
    def heard(ev: Any) -> None:
        if ev.is_final:
            record("user_transcript", text=ev.transcript)

    @session.on("agent_state_changed")
    def state(ev: Any) -> None:
        record("agent_state", state=ev.new_state)

    @session.on("user_state_changed")
    def user_state(ev: Any) -> None:
        record("user_state", state=ev.new_state)

    @session.on("speech_created")
    def speech(ev: Any) -> None:
        record("speech_created", source=ev.source, user_initiated=ev.user_initiated)

    @session.on("conversation_item_added")
    def said(ev: Any) -> None:
        if ev.item.role == "assistant":
            record("agent_said", text=ev.item.text_content or "")

    @session.on("error")
    def error(ev: Any) -> None:
        record("error", error=str(ev.error))

    return session


new_session = receptionist.new_session
receptionist.new_session = recorded_session


async def entrypoint(ctx: JobContext) -> None:
    record("job", job_id=ctx.job.id, room=ctx.job.room.name)

    @ctx.room.on("sip_dtmf_received")
    def on_dtmf(dtmf: rtc.SipDTMF) -> None:
        record("dtmf", digit=dtmf.digit, code=dtmf.code, identity=dtmf.participant.identity)

    @ctx.room.on("track_subscribed")
    def on_subscribed(
        track: rtc.Track, pub: rtc.RemoteTrackPublication, caller: rtc.RemoteParticipant
    ) -> None:
        record(
            "track_subscribed",
            agent=ctx.room.local_participant.identity,
            identity=caller.identity,
            name=caller.name,
            kind=int(caller.kind),
            attributes=dict(caller.attributes),
        )

    @ctx.room.on("participant_attributes_changed")
    def on_attributes(changed: dict[str, str], caller: rtc.Participant) -> None:
        record("attributes_changed", identity=caller.identity, changed=dict(changed))

    await receptionist.entrypoint(ctx)


if __name__ == "__main__":
    # A loaded 2-core machine takes longer than the default 10 s to start the inference process,
    # and its CPU load would mark the worker full (production's load_threshold 0.7).
    options = WorkerOptions(
        load_threshold=math.inf,
        entrypoint_fnc=entrypoint,
        prewarm_fnc=receptionist.prewarm,
        initialize_process_timeout=INITIALIZE_TIMEOUT_S,
        num_idle_processes=1,
    )
    cli.run_app(options)
