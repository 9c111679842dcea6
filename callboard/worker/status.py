"""The worker's status as the server sees it: its state and the
UpdateWorkerStatus messages (on every change, and every `status_interval` regardless)."""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum
from typing import TYPE_CHECKING

from livekit.protocol import agent

if TYPE_CHECKING:
    from callboard.worker.worker import Worker


class WorkerState(Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    AVAILABLE = "available"
    FULL = "full"
    DRAINING = "draining"
    STOPPED = "stopped"


class StatusReporter:
    """Sends UpdateWorkerStatus when what the server last heard differs from now, and on
    every tick of `status_interval`."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._reported: tuple[int, int] | None = None
        """(status, job_count) of the last UpdateWorkerStatus sent."""
        self._changed = asyncio.Event()

    def now(self) -> tuple[int, int]:
        """(status, job_count) as the server should see them now."""
        w = self._worker
        full = w.capacity_problem() is not None
        return (agent.WS_FULL if full else agent.WS_AVAILABLE), len(w.active_jobs)

    def message(self) -> agent.WorkerMessage:
        """The UpdateWorkerStatus to send now; remembered as the last one reported."""
        status, job_count = self.now()
        self._reported = (status, job_count)
        upd = agent.UpdateWorkerStatus(
            status=status,  # type: ignore[arg-type]
            load=self._worker.load,
            job_count=job_count,
            draining=self._worker.draining,
        )
        return agent.WorkerMessage(update_worker=upd)

    def send(self) -> None:
        if self._worker.registered:
            self._worker.send(self.message())

    def check(self) -> None:
        """Wake the status task at once if the server's view is out of date."""
        if self._worker.registered and self._reported != self.now():
            self._changed.set()

    async def run(self, interval: float) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands
            # as the event is set, and this loop would then outlive aclose().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._changed.wait()
            self._changed.clear()
            self.send()
