"""What operators run: the dashboard against a real Prometheus, the alert rules, compose, Kubernetes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from tests.conftest import REPO, worker_env
from tests.support.faulty import POISON_BGR
from tests.support.redis_server import free_port
from tests.support.workers import WorkerProcess
from worker.client import Client
from worker.core.protocol import Keys

pytestmark = pytest.mark.slow
CONFIG = REPO / "config"
K8S = REPO / "deploy" / "k8s"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup.sh --test installs it)")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("promtool"), *args], cwd=CONFIG / "prometheus", capture_output=True, text=True, check=False
    )


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    redis_url: str, photos: list[Path], tmp_path: Path
) -> None:
    """A worker processes real photos (and a job that fails until it is dead-lettered) while a real
    Prometheus scrapes it; then every panel's query runs through Prometheus's HTTP API."""
    dashboard = json.loads((CONFIG / "grafana" / "dashboards" / "imgworker.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    env = worker_env(
        redis_url,
        IMGWORKER_BACKEND__KIND="tests.support.faulty:TransientFakeBackend",
        IMGWORKER_REDIS__MAX_DELIVERIES="2",
        IMGWORKER_REDIS__RETRY_BACKOFF_S="0.2",
        IMGWORKER_BACKEND__FAKE__IMAGE_MS="5",
    )
    poison = cv2.imencode(".png", np.full((96, 64, 3), POISON_BGR, np.uint8))[1].tobytes()
    with WorkerProcess(env) as worker:
        worker.wait_ready()
        prometheus_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "imgworker", "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}]}
                    ],
                }
            )
        )
        prometheus = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with Client(redis_url) as client:
                job_ids = client.submit_many([*photos[:40], poison])
                results = client.wait_many(job_ids, timeout_s=120)
                client.submit_many(photos[40:70])  # still a backlog while Prometheus scrapes
            assert {r.code for r in results.values()} == {"", "max_deliveries"}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _query(prometheus_port, "imgworker_ready"):
                time.sleep(0.5)
            time.sleep(6)  # several scrapes: rates need two samples in their window
            empty = []
            checked = 0
            for panel in panels:
                for target in panel["targets"]:
                    if "imgworker_gpu_" in target["expr"]:
                        continue  # NVML series exist on GPU workers only (run there: scripts/bench_gpu.py)
                    checked += 1
                    if not _query(prometheus_port, target["expr"]):
                        empty.append(f"{panel['title']}: {target['expr']}")
        finally:
            prometheus.terminate()
            prometheus.wait(30)
    print(f"{checked} dashboard queries over {len(panels)} panels returned data")
    assert checked >= 25 and not empty, empty


def test_kubernetes_manifests_validate() -> None:
    """Built-in kinds against the Kubernetes schema (strict); the CRDs (KEDA, Prometheus operator)
    have no schema there, so their essentials are checked here against the worker's own settings."""
    manifests = sorted(K8S.glob("*.yaml")) + sorted((K8S / "sharded").glob("*.yaml"))
    run = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *map(str, manifests)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed for resource") == 3, run.stdout  # namespace, configmap, deployment
    documents = {
        doc["kind"]: doc for path in manifests for doc in yaml.safe_load_all(path.read_text()) if doc is not None
    }
    deployment = documents["Deployment"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert deployment["terminationGracePeriodSeconds"] > 25  # above shutdown_grace_s
    assert container["securityContext"]["readOnlyRootFilesystem"] and deployment["securityContext"]["runAsNonRoot"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    scaled = yaml.safe_load_all((K8S / "scaledobject.yaml").read_text())
    triggers = next(doc for doc in scaled if doc["kind"] == "ScaledObject")["spec"]["triggers"]
    assert [t["metadata"]["stream"] for t in triggers] == list(Keys().streams)
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {"workers"}
    assert all(t["type"] == "redis-streams" and "streamLength" in t["metadata"] for t in triggers)


def test_the_compose_file_is_valid_and_mounts_files_that_exist() -> None:
    run = subprocess.run(
        [_tool("podman-compose"), "-f", "compose.yaml", "--profile", "gpu", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load(run.stdout)
    assert {"redis", "worker", "worker-gpu", "prometheus", "grafana"} <= set(config["services"])
    assert config["services"]["worker-gpu"]["profiles"] == ["gpu"]
    assert "--appendonly" in config["services"]["redis"]["command"]
    for service in config["services"].values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source


def test_the_cluster_compose_overlay_puts_every_worker_on_the_sharded_cluster() -> None:
    run = subprocess.run(
        [_tool("podman-compose"), "-f", "compose.yaml", "-f", "compose.cluster.yaml", "--profile", "gpu", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    nodes = [name for name in services if name.startswith("redis-node-")]
    assert len(nodes) == 6 and all("--cluster-enabled" in services[n]["command"] for n in nodes)
    assert "--cluster-replicas 1" in services["redis-cluster-create"]["command"][0]
    for worker in ("worker", "worker-gpu"):
        env = services[worker]["environment"]
        assert env["IMGWORKER_REDIS__CLUSTER"] == "true" and int(env["IMGWORKER_REDIS__SHARDS"]) > 1
        assert env["IMGWORKER_REDIS__URL"].startswith("redis://redis-node-")
        assert services[worker]["depends_on"]["redis-cluster-create"]["condition"] == "service_completed_successfully"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_the_compose_stack_serves_jobs_beside_a_redis_on_the_default_port(tmp_path: Path) -> None:
    """compose.yaml as a user runs it with podman-compose, on a machine where a Redis already holds
    port 6379 (CI's does): the images built here (the worker's with its health check kept), Redis
    reached by service name, the demo photos enqueued inside the worker's container."""
    from tests.support.containers import REDIS_IMAGE, WORKER_IMAGE, build_images, podman_env

    env = podman_env(tmp_path)
    size = build_images(env)
    print(f"cpu image: {size / 1e6:.0f} MB")
    assert size <= 450e6, f"the cpu image is {size / 1e6:.0f} MB"
    healthcheck = subprocess.run(
        ["podman", "image", "inspect", WORKER_IMAGE, "--format", "{{json .Config.Healthcheck}}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/healthz" in healthcheck, healthcheck
    compose = [_tool("podman-compose"), "-p", f"imgworker-test-{free_port()}", "-f", "compose.yaml"]
    metrics_port = free_port()
    up_env = {**env, "WORKER_METRICS_PORT": str(metrics_port)}

    def podman_compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], cwd=REPO, env=up_env, capture_output=True, text=True, timeout=300, check=False
        )

    config = yaml.safe_load(podman_compose("config").stdout)
    assert "ports" not in config["services"]["redis"]
    assert config["services"]["redis"]["image"] in ("redis:7", REDIS_IMAGE)
    try:
        up = podman_compose("up", "-d", "redis", "worker")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 180
        while not _answers(f"http://127.0.0.1:{metrics_port}/readyz"):
            if time.monotonic() > deadline:
                pytest.fail(f"the worker never became ready:\n{podman_compose('logs', 'worker').stdout[-3000:]}")
            time.sleep(1)
        enqueue = podman_compose(
            "exec", "-T", "worker", "imgworker", "enqueue", "--wait", "--json", "/opt/imgworker-assets/demo"
        )
        lines = [json.loads(line) for line in enqueue.stdout.splitlines() if line.startswith("{")]
        assert enqueue.returncode == 0 and len(lines) >= 13, enqueue.stdout[-3000:] + enqueue.stderr[-3000:]
        assert all(line["status"] == "ok" and line["result"]["boxes"] for line in lines), lines
    finally:
        podman_compose("down", "-v")
