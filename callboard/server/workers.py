"""Registered workers as the dispatch engine sees them, and their weighted selection."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from livekit.protocol import agent, models

Send = Callable[[agent.ServerMessage], Awaitable[None]]


@dataclass(eq=False)
class WorkerSession:
    """One registered /agent connection: what it registered, what it reports, what it runs."""

    id: str
    api_key: str
    agent_name: str
    namespace: str
    job_type: int
    version: str
    permissions: models.ParticipantPermission
    send: Send
    status: int = agent.WS_AVAILABLE
    load: float = 0.0
    job_count: int = 0
    status_seq: int = 0
    draining: bool = False
    closed: bool = False
    jobs: set[str] = field(default_factory=set)
    """Ids of the jobs assigned to this worker and not yet ended."""
    pending: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)
    """AvailabilityRequests sent and not yet answered, by job id."""

    @property
    def log_fields(self) -> dict[str, object]:
        return {"worker_id": self.id, "agent_name": self.agent_name}

    def serves(self, job: agent.Job) -> bool:
        return (
            self.agent_name == job.agent_name
            and self.namespace == job.namespace
            and self.job_type == job.type
        )

    def update_status(self, update: agent.UpdateWorkerStatus) -> bool:
        """Apply an UpdateWorkerStatus; False when it is older than one already applied."""
        if update.seq:
            if update.seq <= self.status_seq:
                return False
            self.status_seq = update.seq
        if update.HasField("status"):
            self.status = update.status
        self.load = clamp_load(update.load)
        self.job_count = update.job_count
        self.draining = update.draining
        return True

    @property
    def available(self) -> bool:
        return not self.closed and not self.draining and self.status == agent.WS_AVAILABLE


def clamp_load(load: float) -> float:
    """A reported load as a fraction in [0, 1]; NaN or infinity counts as fully loaded.

    The load comes off the wire: a negative or infinite value must not turn into an infinite
    selection weight (which made `random.choices` raise and stranded every job placed after it).
    """
    return min(max(load, 0.0), 1.0) if math.isfinite(load) else 1.0


def pick_weighted(
    workers: Iterable[WorkerSession], job: agent.Job, tried: set[str], rng: random.Random
) -> WorkerSession | None:
    """An available worker for `job`, not yet tried, chosen with weight 1 − load (LiveKit's rule).

    None when no candidate has free capacity.
    """
    candidates: list[WorkerSession] = []
    weights: list[float] = []
    for w in workers:
        if w.id in tried or not w.available or not w.serves(job):
            continue
        free = max(0.0, 1.0 - w.load)
        if free > 0.0:
            candidates.append(w)
            weights.append(free)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    return rng.choices(candidates, weights=weights, k=1)[0]
