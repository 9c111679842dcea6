"""Agents used by the job-engine tests; importable so the zygote can find them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from callboard import JobContext, JobProcess

BRIDGE_REPORT_ENV = "CALLBOARD_TEST_REPORT"
"""Where tests/job/livekit_agents_agent.py writes what it saw (JSON lines)."""
BRIDGE_EXECUTOR_ENV = "CALLBOARD_TEST_EXECUTOR"


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prewarmed_pid"] = os.getpid()


def failing_prewarm(proc: JobProcess) -> None:
    raise RuntimeError("model file missing")


async def quick(ctx: JobContext) -> None:
    assert ctx.proc.userdata.get("prewarmed_pid") == os.getpid()
    await asyncio.sleep(0.05)


async def short(ctx: JobContext) -> None:
    await asyncio.sleep(0.5)


async def raises(ctx: JobContext) -> None:
    raise ValueError("agent bug")


async def exits(ctx: JobContext) -> None:
    os._exit(3)


async def forever(ctx: JobContext) -> None:
    await asyncio.Event().wait()


async def blocks_loop(ctx: JobContext) -> None:
    while True:
        time.sleep(1)  # noqa: ASYNC251 (blocking the loop is the point)


async def hogs_memory(ctx: JobContext) -> None:
    hog = []
    while True:
        hog.append(bytearray(16 * 1024 * 1024))
        await asyncio.sleep(0.02)


async def slow_shutdown_callback(ctx: JobContext) -> None:
    async def cb(reason: str) -> None:
        await asyncio.sleep(0.01)

    ctx.add_shutdown_callback(cb)
    await asyncio.Event().wait()


STUBBORN_BLOCK_S = 3.0


async def shares_a_process(ctx: JobContext) -> None:
    """Logs a line without ids (the job engine adds them); then by its room's name: `crash`
    kills its whole process, `stubborn` blocks its loop for STUBBORN_BLOCK_S when asked to
    stop; any other runs until it is stopped."""
    logging.getLogger("tests.job.shared").warning("job says hello")
    room = ctx.job.room.name
    if "crash" in room:
        await asyncio.sleep(0.3)
        os._exit(3)
    if "stubborn" in room:

        async def block(reason: str) -> None:
            time.sleep(STUBBORN_BLOCK_S)  # noqa: ASYNC251 (ignoring the stop is the point)

        ctx.add_shutdown_callback(block)
    await asyncio.Event().wait()


def flaky_prewarm(proc: JobProcess) -> None:
    """Fails in every other process (a counter file shared through the environment)."""
    path = os.environ["CALLBOARD_TEST_PREWARM_COUNTER"]
    with open(path, "a+") as f:
        f.seek(0)
        count = len(f.read())
        f.write("x")
    if count % 2 == 0:
        raise RuntimeError(f"prewarm attempt {count} fails on purpose")
    proc.userdata["prewarmed_pid"] = os.getpid()


async def reports_its_process(ctx: JobContext) -> None:
    """Writes what a fresh job process looks like: its randomness, descriptors and threads."""
    import random
    import threading

    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the directory listing's own descriptor, already closed
            continue
    line = {
        "pid": os.getpid(),
        "random": random.random(),
        "fds": fds,
        "threads": threading.active_count(),
    }
    with open(os.environ["CALLBOARD_TEST_PROCESS_OUT"], "a") as f:  # noqa: ASYNC230
        f.write(json.dumps(line) + "\n")


CALLS_OUT_ENV = "CALLBOARD_TEST_CALLS_OUT"


def _record_call(what: str) -> None:
    with open(os.environ[CALLS_OUT_ENV], "a") as out:
        out.write(f"{what} {os.getpid()}\n")


def recording_prewarm(proc: JobProcess) -> None:
    _record_call("prewarm")


async def recording_entry(ctx: JobContext) -> None:
    _record_call("entry")


MEMBERS_OUT_ENV = "CALLBOARD_TEST_MEMBERS_OUT"


async def uses_livekit_agents_members(ctx: JobContext) -> None:
    """Exercises the members callboard's JobContext has for parity with livekit-agents'."""
    seen: dict[str, object] = {
        "is_fake_job": ctx.is_fake_job(),
        "token_identity": ctx.token_claims().identity,
        "local_participant_identity": ctx.local_participant_identity,
        "session_directory": str(ctx.session_directory),
        "session_directory_exists": ctx.session_directory.is_dir(),
        "inference_headers": ctx.inference_headers,
        "simulation_context": ctx.simulation_context(),
    }
    try:
        ctx.primary_session  # noqa: B018 (the property raises: no AgentSession here)
    except RuntimeError as e:
        seen["primary_session"] = str(e)
    ctx.log_context_fields = {"custom": "field"}
    seen["log_context_fields"] = ctx.log_context_fields
    deleted = await ctx.delete_room()
    seen["delete_room"] = type(deleted).__name__
    with open(os.environ[MEMBERS_OUT_ENV], "w") as f:  # noqa: ASYNC230 (tiny test write)
        json.dump(seen, f)
