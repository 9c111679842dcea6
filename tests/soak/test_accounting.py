"""What the soak counts as the right end of a job whose worker went away."""

from __future__ import annotations

from livekit.protocol import agent

from tests.soak.accounting import DispatchRecord, account

GONE = "worker AW_gone disconnected and no MigrateJobRequest came within 15s"


def server_failed(job_id: str, worker_id: str) -> DispatchRecord:
    """A job without a fault that the server failed because its worker left."""
    state = agent.JobState(status=agent.JS_FAILED, error=GONE, worker_id=worker_id)
    job = agent.Job(id=job_id, state=state)
    return DispatchRecord(67, "none", "soak-00067", 2, jobs=[job], dispatches=1)


def test_a_job_failed_with_its_sigkilled_worker_is_expected() -> None:
    acc = account([server_failed("AJ_1", "AW_gone")], [], {}, {"AW_gone"})
    assert acc.unexpected == [] and acc.worker_gone == 1


def test_a_job_failed_on_a_worker_that_was_only_cut_off_is_unexpected() -> None:
    """A cut worker claims every job it accepted, even one whose assignment the cut swallowed
    (the soak's job #67): the server serves it, so a worker-gone failure is a defect."""
    acc = account([server_failed("AJ_1", "AW_gone")], [], {}, {"AW_other"})
    assert acc.worker_gone == 0 and len(acc.unexpected) == 1
    assert "expected JS_SUCCESS" in acc.unexpected[0]
