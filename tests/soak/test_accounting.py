"""What the soak counts as the right end of a job whose worker went away."""

from __future__ import annotations

from livekit.protocol import agent

from tests.soak.accounting import DispatchRecord, account, withdrawn_offers

GONE = "worker AW_cut disconnected and no MigrateJobRequest came within 15s"


def withdrawn(job_id: str) -> list[dict[str, str]]:
    """The worker's log line for an offer it dropped when its connection was cut."""
    return [
        {"message": "offer withdrawn before assignment", "job_id": job_id, "worker_id": "AW_cut"}
    ]


def server_failed(job_id: str, worker_id: str) -> DispatchRecord:
    """A job without a fault that the server failed because its worker left."""
    state = agent.JobState(status=agent.JS_FAILED, error=GONE, worker_id=worker_id)
    job = agent.Job(id=job_id, state=state)
    return DispatchRecord(67, "none", "soak-00067", 2, jobs=[job], dispatches=1)


def test_a_job_whose_assignment_was_lost_in_a_cut_is_failed_by_the_server_as_expected() -> None:
    acc = account(
        [server_failed("AJ_1", "AW_cut")], [], {}, set(), withdrawn_offers(withdrawn("AJ_1"))
    )
    assert acc.unexpected == [] and acc.worker_gone == 1


def test_a_job_failed_on_a_worker_that_neither_died_nor_dropped_it_is_unexpected() -> None:
    acc = account(
        [server_failed("AJ_1", "AW_cut")], [], {}, set(), withdrawn_offers(withdrawn("AJ_2"))
    )
    assert acc.worker_gone == 0 and len(acc.unexpected) == 1
    assert "expected JS_SUCCESS" in acc.unexpected[0]
