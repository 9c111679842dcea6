"""The worker's logs: the seed's messages, with ids in their extra fields; and no API secret or
token in any record, raw or formatted, through a job, a reconnect, a failure and a drain.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from livekit.protocol import agent

from callboard import JobExecutorType, Worker
from callboard.log import REDACTED, JsonFormatter, extra_fields, redact
from callboard.server.app import run_server
from callboard.server.config import ServerConfig
from callboard.version import __version__
from tests.worker.agents.jobs import script
from tests.worker.support import (
    control,
    fast_options,
    no_leftover_children,
    records_with,
    running_worker,
    wait_until,
)

KEY: Final = "key1"
SECRET: Final = "Vb7nQ2xL9pR4tK8wZ3mS6yH1cJ5dF0gA2eU7iO4q"
AGENT: Final = "logged"


@pytest.fixture
def json_output() -> Iterator[io.StringIO]:
    """Everything logged, formatted as production does it (JSON lines)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def raw_text(record: logging.LogRecord) -> str:
    """A record as it is before any formatter could redact it."""
    parts = [record.getMessage(), repr(extra_fields(record))]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


@pytest.mark.parametrize(
    "executor",
    [
        pytest.param(JobExecutorType.THREAD, id="thread"),
        pytest.param(JobExecutorType.PROCESS, id="process"),
    ],
)
async def test_seed_messages_with_ids_and_no_secret_or_token_anywhere(
    caplog: pytest.LogCaptureFixture,
    json_output: io.StringIO,
    tmp_path: Path,
    executor: JobExecutorType,
) -> None:
    caplog.set_level(logging.DEBUG)
    release = tmp_path / "release"
    tokens: list[str] = []
    async with (
        no_leftover_children(),
        run_server(ServerConfig(port=0, keys={KEY: SECRET})) as server,
        control(server, KEY, SECRET) as ctl,
    ):
        opts = fast_options(server, executor, key=KEY, secret=SECRET, agent_name=AGENT)
        async with running_worker(opts) as worker:
            await ctl.dispatch("logs-room", AGENT, script(until=str(release)))
            job = await ctl.wait_status("logs-room", agent.JS_RUNNING, agent_name=AGENT)
            await wait_until(lambda: len(worker.active_jobs) == 1, "the job to run")
            tokens.append(worker.active_jobs[0].info.token)
            old_id = worker.id
            worker._conn.cut()
            await wait_until(lambda: worker.registered and worker.id != old_id, "re-register")
            release.touch()
            await ctl.wait_status("logs-room", agent.JS_SUCCESS, agent_name=AGENT)
            await ctl.dispatch("failing-room", AGENT, script(**{"raise": "agent bug"}))
            await ctl.wait_status("failing-room", agent.JS_FAILED, agent_name=AGENT)
            await ctl.dispatch("drain-room", AGENT, script(sleep=0.2))
            await wait_until(lambda: len(worker.active_jobs) == 1, "the last job to run")
            tokens.append(worker.active_jobs[0].info.token)
            await worker.drain(5.0)
            worker_id = worker.id

    records = [r for r in caplog.records if r.name.startswith("callboard")]
    (starting,) = records_with(records, "starting worker")
    assert starting.version == __version__  # type: ignore[attr-defined]
    first, again = records_with(records, "registered worker")
    assert first.id == old_id and again.id == worker_id  # type: ignore[attr-defined]
    assert first.region == "local"  # type: ignore[attr-defined]
    assert first.url == server.url  # type: ignore[attr-defined]
    received = records_with(records, "received job request")
    assert job.id in [r.job_id for r in received]  # type: ignore[attr-defined]
    assert all(r.room_name for r in received)  # type: ignore[attr-defined]
    (draining,) = records_with(records, "draining worker")
    assert draining.worker_id == worker_id  # type: ignore[attr-defined]
    assert draining.timeout == 5.0  # type: ignore[attr-defined]
    ended = records_with(records, "job ended")
    assert {r.job_id for r in ended if r.name == "callboard.worker"} >= {job.id}  # type: ignore[attr-defined]

    assert all(tokens) and len(set(tokens)) == 2
    for record in caplog.records:
        text = raw_text(record)
        assert SECRET not in text, f"the API secret is in {record.getMessage()!r}"
        assert "eyJ" not in text, f"a token is in {record.getMessage()!r}"
    output = json_output.getvalue()
    assert "registered worker" in output
    assert SECRET not in output
    for token in tokens:
        assert token not in output
    assert "eyJ" not in output


async def test_the_worker_registers_its_secret_for_redaction() -> None:
    """Even with no server in the process, a worker's own secret is redacted from logs."""
    secret = "Worker-only-secret-0123456789abcdefghijk"
    opts = fast_options(_NoServer(), key=KEY, secret=secret)
    worker = Worker(opts, register=False)
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port != 0, "the worker to start")
        assert redact(f"oops {secret} leaked") == f"oops {REDACTED} leaked"
    finally:
        worker.request_shutdown()
        await asyncio.wait_for(run, 10.0)


class _NoServer:
    url = "ws://127.0.0.1:9"
