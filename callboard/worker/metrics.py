"""Prometheus metrics of one worker, in a registry of its own (no process-global state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from callboard.job.runner import JobOutcome

if TYPE_CHECKING:
    from collections.abc import Iterator

    from callboard.worker.load import LoadTracker
    from callboard.worker.worker import Worker

START_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ANSWER_LATENCY_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MB: Final = 1024 * 1024


class WorkerMetrics:
    """Counters the worker updates as things happen; gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.offers = Counter(
            "callboard_job_offers", "Availability requests received", registry=self.registry
        )
        self.jobs = Counter(
            "callboard_jobs", "Jobs ended, by outcome", ["outcome"], registry=self.registry
        )
        self.load = Gauge("callboard_worker_load", "Effective load (0-1)", registry=self.registry)
        self.measured_load = Gauge(
            "callboard_worker_measured_load",
            "Measured load without reservations (0-1)",
            registry=self.registry,
        )
        self.warm_target = Gauge(
            "callboard_warm_pool_target",
            "Jobs the warm pool is asked to start without a fork",
            registry=self.registry,
        )
        self.answer_latency = Histogram(
            "callboard_offer_answer_seconds",
            "From availability request received to answer sent, by answer",
            ["answer"],
            buckets=ANSWER_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.start_latency = Histogram(
            "callboard_job_start_latency_seconds",
            "From availability request received to job running",
            buckets=START_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def job_started(self, latency_s: float) -> None:
        self.start_latency.observe(latency_s)

    def answered(self, accepted: bool, latency_s: float) -> None:
        self.answer_latency.labels(answer="accepted" if accepted else "refused").observe(latency_s)

    def sampled(self, tracker: LoadTracker, load: float) -> None:
        self.load.set(load)
        self.measured_load.set(tracker.measured)

    def job_ended(self, outcome: JobOutcome) -> None:
        self.jobs.labels(outcome="success" if outcome.ok else "failed").inc()

    def attach(self, worker: Worker) -> None:
        self.registry.register(_LiveCollector(worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Active jobs, process counts and per-process memory, read from the worker at scrape."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        w = self._worker
        yield GaugeMetricFamily("callboard_active_jobs", "Jobs running now", len(w.active_jobs))
        admission = w.admission
        capacity = -1 if admission.capacity is None else admission.capacity
        yield GaugeMetricFamily(
            "callboard_worker_capacity_jobs",
            "Jobs that fit at the learned cost (-1: no limit)",
            capacity,
        )
        yield GaugeMetricFamily(
            "callboard_job_cost_cpu_cores", "Learned CPU of one job", admission.cost.cpu
        )
        yield GaugeMetricFamily(
            "callboard_job_cost_memory_bytes",
            "Learned memory (PSS) of one job",
            admission.cost.memory_mb * MB,
        )
        pids = w.executor.process_pids()
        procs = GaugeMetricFamily("callboard_processes", "Job processes", labels=["state"])
        procs.add_metric(["idle"], w.executor.idle_count)
        procs.add_metric(["total"], len(pids))
        yield procs
        mem = GaugeMetricFamily(
            "callboard_process_memory_bytes", "Memory of each process", labels=["pid", "kind"]
        )
        for pid in pids:
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.Error, OSError):
                continue
            mem.add_metric([str(pid), "rss"], info.rss)
            mem.add_metric([str(pid), "uss"], getattr(info, "uss", 0))
            mem.add_metric([str(pid), "pss"], getattr(info, "pss", 0))
        yield mem
