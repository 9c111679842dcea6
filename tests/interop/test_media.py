"""Acceptance test of the job engine with media, against the real livekit-server and against
`callboard server`: a SIP-style phone call answered by a callboard worker (PROCESS executor,
zygote-forked job process).

The call runs in a subprocess (tests/interop/media_call.py) that lives in a private network
namespace: libwebrtc ignores loopback interfaces, and the namespace gives it a veth address
(tests/interop/netns.py) while keeping every packet inside this machine. This test checks the
subprocess's report, the agent's report lines and the worker's relayed job logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from callboard.job.context import PARTICIPANT_DISCONNECT_MESSAGE
from tests.interop.agents import media_agent
from tests.interop.call_process import REPO_ROOT, CallRun, kill_family, run_call_script
from tests.interop.conftest import LIVEKIT_SERVER, SERVER_KINDS
from tests.interop.livekit_server import ServerUnavailable, livekit_server_binary
from tests.interop.media_call import AGENT_REPORT_FILE, CALLER_IDENTITY, ROOM_PREFIX
from tests.interop.netns import unavailable_reason

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150, func_only=True)]

CALL_PROCESS_TIMEOUT_S: Final = 100.0
__all__ = ["REPO_ROOT", "kill_family"]  # until test_media_rooms and test_phone_agent move over
PITCH_TOLERANCE: Final = 0.05
JOB_END_AFTER_HANG_UP_MAX_S: Final = 5.0


def run_call(workdir: Path, kind: str) -> CallRun:
    return run_call_script(
        "tests.interop.media_call",
        [kind],
        workdir,
        CALL_PROCESS_TIMEOUT_S,
        logs=("call.log", AGENT_REPORT_FILE),
    )


def assert_pitch(measured: float, expected: float) -> None:
    assert abs(measured - expected) <= expected * PITCH_TOLERANCE, (measured, expected)


@pytest.fixture(params=SERVER_KINDS)
def media_server_kind(request: pytest.FixtureRequest) -> str:
    """Each server kind; the real livekit-server binary is built here (outside the namespace,
    which has no network) if it is not cached yet."""
    kind: str = request.param
    if kind == LIVEKIT_SERVER:
        try:
            livekit_server_binary()
        except ServerUnavailable as e:
            pytest.skip(str(e))
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return kind


def test_phone_call_with_media(tmp_path: Path, media_server_kind: str) -> None:
    run = run_call(tmp_path, media_server_kind)
    report = run.succeeded()

    # the job: dispatched to our worker for the SIP-style room, in a zygote-forked process
    room, job = report["room"], report["job"]
    assert room.startswith(ROOM_PREFIX) and len(room) == len(ROOM_PREFIX) + 12, room
    assert job["room"] == room and job["id"].startswith("AJ_"), job
    assert job["url"].startswith("ws://127.0.0.1:"), job  # no url in the assignment: ws_url

    # the agent connected and waited for the caller, who came as the SIP gateway makes them
    (caller,) = run.jsonl(AGENT_REPORT_FILE, "caller")
    assert caller["pid"] == job["pid"] and caller["job_id"] == job["id"], caller
    assert caller["agent_identity"] == f"agent-{job['id']}"
    assert caller["identity"] == CALLER_IDENTITY
    assert caller["kind"] == "PARTICIPANT_KIND_SIP"
    assert caller["attributes"] == report["sip_attributes"]
    assert caller["attributes"]["sip.callStatus"] == "active"

    # media both ways: the agent heard the caller's 440 Hz, the caller the agent's 880 Hz
    (heard,) = run.jsonl(AGENT_REPORT_FILE, "heard")
    (final,) = run.jsonl(AGENT_REPORT_FILE, "shutdown")
    assert final["tone_frames"] >= heard["tone_frames"] >= media_agent.HEARD_TONE_FRAMES
    assert final["frames"] >= final["tone_frames"]
    assert_pitch(final["pitch_hz"], media_agent.CALLER_TONE_HZ)
    caller_heard = report["caller_heard"]
    assert caller_heard["tone_frames"] >= media_agent.HEARD_TONE_FRAMES, caller_heard
    assert_pitch(caller_heard["pitch_hz"], media_agent.AGENT_TONE_HZ)

    # the hang-up closed the agent session, logged by the job and relayed with its fields
    (closing,) = run.log_records(PARTICIPANT_DISCONNECT_MESSAGE)
    assert closing["participant"] == CALLER_IDENTITY
    assert closing["reason"] == "CLIENT_INITIATED"
    assert (closing["job_id"], closing["room"], closing["pid"]) == (job["id"], room, job["pid"])
    assert final["reason"] == f"participant {CALLER_IDENTITY} disconnected (CLIENT_INITIATED)"
    (counts,) = run.log_records("agent heard the caller")
    assert (counts["job_id"], counts["pid"], counts["tone_frames"]) == (
        job["id"],
        job["pid"],
        final["tone_frames"],
    )

    # one outcome, JS_SUCCESS: in the worker, and reported to the server
    worker_view = report["worker_view"]
    assert worker_view["active_jobs"] == 0
    assert worker_view["handle_outcome"] == worker_view["recorded_outcome"] == "JS_SUCCESS"
    assert worker_view["handle_error"] == ""
    assert worker_view["ended_after_hang_up_s"] < JOB_END_AFTER_HANG_UP_MAX_S
    ended = report["server_view"]["ended_log"]
    assert (ended["jobID"], ended["workerID"]) == (job["id"], report["worker_id"])
    assert (ended["status"], ended["error"]) == ("JS_SUCCESS", "")

    # nothing left behind: every job process was reaped
    assert report["leftover_children"] == []
