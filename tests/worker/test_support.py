"""The suite's own instruments: the soft child-process leak check must see a leak."""

from __future__ import annotations

import asyncio

import pytest

from tests.worker.support import LeakedChildProcesses, no_leftover_children


async def test_leak_check_warns_about_and_kills_a_leftover_child() -> None:
    with pytest.warns(LeakedChildProcesses, match="child processes left behind"):
        async with no_leftover_children(timeout=0.2):
            proc = await asyncio.create_subprocess_exec("sleep", "30")
    assert await asyncio.wait_for(proc.wait(), 5.0) != 0


async def test_leak_check_is_quiet_when_children_are_reaped() -> None:
    async with no_leftover_children(timeout=0.2):
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
