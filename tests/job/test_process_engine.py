"""The PROCESS executor end to end: zygote-forked job processes, supervised, one outcome each,
nothing leaked (child processes and descriptors are checked after every test)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from livekit import api
from livekit.protocol import agent

from callboard.server.app import EmbeddedServer
from tests.job import agents, inference_agents, preload_agents
from tests.job.support import (
    api_client,
    dispatch_and_wait,
    process_worker,
    terminal_state,
    until,
)


async def test_normal_job_succeeds_in_a_prewarmed_process(server: EmbeddedServer) -> None:
    async with process_worker(server, agents.quick), api_client(server) as lk:
        state = await dispatch_and_wait(lk, "call-normal")
    assert state.status == agent.JS_SUCCESS, state.error


async def test_a_finished_job_process_exits_0_once_the_worker_hangs_up(
    server: EmbeddedServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Regression (found by the soak): after JobDone the process read on while its cancelled
    read was still pending, so every job process died with "readexactly() called while another
    coroutine is already waiting" (exit 4, a traceback on the worker's stderr) instead of
    waiting for the worker's acknowledgement."""
    async with process_worker(server, agents.short) as worker, api_client(server) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name="call-exit-0"))
        await until(lambda: bool(worker.active_jobs), "the job to run")
        handle = worker.active_jobs[0].handle
        state = await terminal_state(lk, "call-exit-0")
        code = await handle.wait_exit()  # type: ignore[attr-defined]
    assert state.status == agent.JS_SUCCESS, state.error
    assert code == 0
    assert "readexactly" not in capfd.readouterr().err


async def test_entrypoint_exception_fails_the_job_with_its_traceback(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with process_worker(server, agents.raises), api_client(server) as lk:
        state = await dispatch_and_wait(lk, "call-raises")
    assert state.status == agent.JS_FAILED
    assert state.error == "entrypoint raised ValueError: agent bug"
    logged = [r for r in caplog.records if r.getMessage().startswith("entrypoint raised")]
    assert logged and "agent bug" in str(getattr(logged[0], "traceback", ""))
    assert getattr(logged[0], "job_id", "").startswith("AJ_")


async def test_process_exit_is_reported_with_its_code(server: EmbeddedServer) -> None:
    async with process_worker(server, agents.exits), api_client(server) as lk:
        state = await dispatch_and_wait(lk, "call-exit")
    assert (state.status, state.error) == (agent.JS_FAILED, "job process exited with code 3")


async def test_sigkill_from_outside_is_reported(server: EmbeddedServer) -> None:
    async with process_worker(server, agents.forever) as worker, api_client(server) as lk:
        await lk.room.create_room(api.CreateRoomRequest(name="call-sigkill"))
        await until(lambda: bool(worker.active_jobs), "the job to run")
        pid = worker.active_jobs[0].handle.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        state = await terminal_state(lk, "call-sigkill")
    assert state.status == agent.JS_FAILED
    assert "killed by SIGKILL" in state.error


async def test_blocked_event_loop_is_dumped_killed_and_reported(
    server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        process_worker(server, agents.blocks_loop, unresponsive_timeout=1.0),
        api_client(server) as lk,
    ):
        state = await dispatch_and_wait(lk, "call-blocked")
    assert state.status == agent.JS_FAILED
    assert "unresponsive" in state.error
    dumps = [r for r in caplog.records if r.getMessage() == "job process stacks before kill"]
    assert dumps and "blocks_loop" in str(getattr(dumps[0], "stacks", ""))


async def test_memory_hog_over_the_limit_is_killed_and_reported(server: EmbeddedServer) -> None:
    async with (
        process_worker(server, agents.hogs_memory, job_memory_limit_mb=150),
        api_client(server) as lk,
    ):
        state = await dispatch_and_wait(lk, "call-hog")
    assert state.status == agent.JS_FAILED
    assert "over job_memory_limit_mb 150" in state.error


async def test_prewarm_failure_replaces_the_process_and_loses_no_job(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLBOARD_TEST_PREWARM_COUNTER", str(tmp_path / "count"))
    async with (
        process_worker(
            server, agents.quick, prewarm_fnc=agents.flaky_prewarm, num_idle_processes=0
        ),
        api_client(server) as lk,
    ):
        states = [await dispatch_and_wait(lk, f"call-flaky-{i}") for i in range(3)]
    assert [(s.status, s.error) for s in states] == [(agent.JS_SUCCESS, "")] * 3
    assert len((tmp_path / "count").read_text()) >= 6  # every job needed a replacement


async def test_burst_of_50_jobs_all_run(server: EmbeddedServer) -> None:
    async with process_worker(server, agents.quick, num_idle_processes=4), api_client(server) as lk:
        rooms = [f"call-burst-{i}" for i in range(50)]
        await asyncio.gather(*(lk.room.create_room(api.CreateRoomRequest(name=r)) for r in rooms))
        states = await asyncio.gather(*(terminal_state(lk, r, 60) for r in rooms))
    failures = [(r, s.error) for r, s in zip(rooms, states, strict=True) if s.status != 2]
    assert failures == []


async def test_termination_mid_job_reports_promptly(server: EmbeddedServer) -> None:
    async with (
        process_worker(server, agents.slow_shutdown_callback) as worker,
        api_client(server) as lk,
    ):
        await lk.room.create_room(api.CreateRoomRequest(name="call-terminate"))
        await until(lambda: bool(worker.active_jobs), "the job to run")
        (d,) = await lk.agent_dispatch.list_dispatch("call-terminate")
        job = worker.active_jobs[0]
        started = time.perf_counter()
        await lk.agent_dispatch.delete_dispatch(d.id, "call-terminate")
        outcome = await job.handle.wait()
        elapsed = time.perf_counter() - started
        remaining = await lk.agent_dispatch.list_dispatch("call-terminate")
    assert outcome.ok, outcome.error
    assert elapsed < 1.0, f"final status took {elapsed:.3f}s (livekit-agents waits 15 s)"
    assert remaining == []


async def test_jobs_share_one_inference_process(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "inference.txt"
    monkeypatch.setenv(inference_agents.RESULTS_ENV, str(out))
    async with process_worker(server, inference_agents.uses_inference), api_client(server) as lk:
        states = [await dispatch_and_wait(lk, f"call-inference-{i}") for i in range(2)]
    assert [(s.status, s.error) for s in states] == [(agent.JS_SUCCESS, "")] * 2
    lines = [line.split() for line in out.read_text().splitlines()]
    job_pids = {int(pid) for pid, _ in lines}
    served_by = {result.split("|")[1] for _, result in lines}
    assert {result.split("|")[0] for _, result in lines} == {"cba"}
    assert len(job_pids) == 2 and len(served_by) == 1
    assert int(served_by.pop()) not in job_pids


async def test_reload_runs_new_code_in_fresh_processes(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "reloadable_agent.py"
    out = tmp_path / "versions.txt"
    source = (
        "import os\n"
        "async def entry(ctx):\n"
        "    with open(os.environ['CALLBOARD_TEST_VERSIONS'], 'a') as f:\n"
        "        f.write('CODE_VERSION\\n')\n"
    )
    module.write_text(source.replace("CODE_VERSION", "v1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLBOARD_TEST_VERSIONS", str(out))
    import reloadable_agent  # type: ignore[import-not-found]

    async with process_worker(server, reloadable_agent.entry) as worker, api_client(server) as lk:
        first = await dispatch_and_wait(lk, "call-v1")
        assert first.status == agent.JS_SUCCESS, first.error
        module.write_text(source.replace("CODE_VERSION", "v2"))
        await worker.executor.reload()  # type: ignore[attr-defined]
        await dispatch_and_wait(lk, "call-v2")
    assert out.read_text().split() == ["v1", "v2"]


async def test_spawn_start_method_runs_jobs_and_inference_in_fresh_interpreters(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "inference.txt"
    monkeypatch.setenv(inference_agents.RESULTS_ENV, str(out))
    async with (
        process_worker(
            server, inference_agents.uses_inference, multiprocessing_context="spawn"
        ) as worker,
        api_client(server) as lk,
    ):
        state = await dispatch_and_wait(lk, "call-spawned")
        zygote = psutil.Process(worker.executor.process_pids()[0])
        cmdlines = [" ".join(c.cmdline()) for c in zygote.children()]
    assert (state.status, state.error) == (agent.JS_SUCCESS, "")
    assert any("callboard.job.spawned" in c for c in cmdlines), cmdlines
    assert out.read_text().split()[1].startswith("cba|")


async def test_the_zygote_is_single_threaded(server: EmbeddedServer) -> None:
    async with process_worker(server, agents.quick) as worker:
        zygote = psutil.Process(worker.executor.process_pids()[0])
        assert zygote.num_threads() == 1


async def test_before_fork_hooks_run_once_in_the_zygote_and_jobs_share_what_they_built(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    out = tmp_path / "preload.txt"
    monkeypatch.setenv(preload_agents.OUT_ENV, str(out))
    async with process_worker(server, preload_agents.uses_model) as worker:
        zygote_pid = worker.executor.process_pids()[0]
        async with api_client(server) as lk:
            states = [await dispatch_and_wait(lk, f"call-preload-{i}") for i in range(2)]
    assert [(s.status, s.error) for s in states] == [(agent.JS_SUCCESS, "")] * 2
    lines = [line.split() for line in out.read_text().splitlines()]
    assert lines.count(["hook", str(zygote_pid)]) == 1, lines
    entries = [line for line in lines if line[0] == "entry"]
    assert len(entries) == 2 and {built_in for _, _, built_in in entries} == {str(zygote_pid)}
    failed = [r for r in caplog.records if "before-fork preload failed" in r.getMessage()]
    assert failed and "model file unreadable" in failed[0].error


async def test_the_zygote_rehearses_a_job_without_running_user_code(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote runs one no-op job through the job-process path before it forks (so that
    state is shared, not rebuilt in every child); the agent's prewarm and entrypoint must still
    run only in job processes, once per process and once per job."""
    out = tmp_path / "calls.txt"
    monkeypatch.setenv(agents.CALLS_OUT_ENV, str(out))
    async with process_worker(
        server, agents.recording_entry, prewarm_fnc=agents.recording_prewarm
    ) as worker:
        await until(lambda: worker.executor.idle_count == 2, "the warm pool")
        zygote_pid = worker.executor.process_pids()[0]
        async with api_client(server) as lk:
            state = await dispatch_and_wait(lk, "call-rehearsed")
    assert state.status == agent.JS_SUCCESS, state.error
    calls = [line.split() for line in out.read_text().splitlines()]
    assert [what for what, _ in calls].count("entry") == 1, calls
    assert all(int(pid) != zygote_pid for _, pid in calls), calls
    entry_pid = next(pid for what, pid in calls if what == "entry")
    assert ["prewarm", entry_pid] in calls


async def test_forked_processes_reseed_randomness_and_keep_only_their_descriptors(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "processes.jsonl"
    monkeypatch.setenv("CALLBOARD_TEST_PROCESS_OUT", str(out))
    async with process_worker(server, agents.reports_its_process):
        async with api_client(server) as lk:
            for i in range(3):
                await dispatch_and_wait(lk, f"call-fresh-{i}")
        worker_fds = len(os.listdir("/proc/self/fd"))
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({s["pid"] for s in seen}) == 3
    assert len({s["random"] for s in seen}) == 3, "each process must reseed its RNG"
    for s in seen:
        # stdio, the IPC socket, the stack-dump file, the event loop's selector and self-pipe
        sockets = [fd for fd in s["fds"] if fd.startswith("socket:")]
        assert len(s["fds"]) <= 8, s["fds"]
        assert len(sockets) <= 3, s["fds"]
        assert s["threads"] == 1
    assert worker_fds > 8  # the worker itself holds far more: none of them leaked into jobs


async def test_the_members_callboard_has_for_livekit_agents_parity_work(
    server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "members.json"
    monkeypatch.setenv(agents.MEMBERS_OUT_ENV, str(out))
    async with (
        process_worker(server, agents.uses_livekit_agents_members) as worker,
        api_client(server) as lk,
    ):
        ended = asyncio.ensure_future(worker.wait_first_job_end())
        await lk.room.create_room(api.CreateRoomRequest(name="call-members"))
        outcome = await asyncio.wait_for(ended, 15)
        rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=["call-members"]))
    assert (outcome.status, outcome.error) == (agent.JS_SUCCESS, "")
    seen = json.loads(out.read_text())
    assert seen["is_fake_job"] is False
    assert seen["token_identity"] == seen["local_participant_identity"]
    assert seen["token_identity"].startswith("agent-AJ_"), seen
    left_behind = await asyncio.to_thread(os.path.exists, seen["session_directory"])
    assert seen["session_directory_exists"] and not left_behind
    assert seen["inference_headers"] == {} and seen["simulation_context"] is None
    assert "no AgentSession" in seen["primary_session"]
    assert seen["log_context_fields"] == {"custom": "field"}
    assert seen["delete_room"] == "DeleteRoomResponse" and list(rooms.rooms) == []
