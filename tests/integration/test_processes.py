"""Several processes: the engine server and its remote lanes, and `run --processes` under a supervisor."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.conftest import REPO, worker_env
from tests.support.workers import WorkerProcess
from worker.backends.fake import FakeBackend
from worker.backends.remote import RemoteBackend
from worker.client import Client
from worker.compute.graph import engine_output
from worker.core.buckets import ModelSpec
from worker.core.errors import BackendError, EngineLoadError, ShapeOutOfProfileError
from worker.core.protocol import Keys
from worker.core.settings import BackendSettings

pytestmark = pytest.mark.slow
KEYS = Keys()


@pytest.fixture
def engine_server(tmp_path: Path, redis_url: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`imgworker serve-engine` with the fake backend, on a socket in tmp_path."""
    socket_path = tmp_path / "engine.sock"
    env = worker_env(redis_url, IMGWORKER_BACKEND__KIND="fake", IMGWORKER_BACKEND__FAKE__LANES="3")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve-engine", "--socket", str(socket_path)], cwd=REPO, env=env
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the engine server did not start"
        time.sleep(0.05)
    yield process, socket_path
    process.kill()
    process.wait()


def _remote(spec: ModelSpec, onnx_path: Path, socket_path: Path) -> RemoteBackend:
    settings = BackendSettings(kind="remote", remote={"address": str(socket_path), "connect_timeout_s": 5})
    backend = RemoteBackend(spec, onnx_path, settings)
    backend.open()
    return backend


def test_remote_lanes_run_on_the_engine_server_as_the_backend_would_locally(
    engine_server: tuple[subprocess.Popen[bytes], Path], spec: ModelSpec, onnx_path: Path
) -> None:
    _, socket_path = engine_server
    rng = np.random.default_rng(5)
    with FakeBackend(spec, onnx_path, BackendSettings(kind="fake")) as local:
        remote = _remote(spec, onnx_path, socket_path)
        try:
            for bucket in spec.buckets:
                n, h, w = bucket.opt
                pixels = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
                outputs = []
                for lane in (remote.lanes(bucket.id)[1], local.lanes(bucket.id)[0]):
                    lane.input(n, h, w)[:] = pixels
                    outputs.append(np.array(lane.run(n, h, w)[engine_output(spec)]))
                np.testing.assert_array_equal(outputs[0], outputs[1])
                # the server's wait for a free lane, beside the fake engine's own (simulated) execution
                assert set(remote.lanes(bucket.id)[1].timings) == {"lane_wait", "execute"}
            lane = remote.lanes(spec.buckets[0].id)[0]
            too_big = spec.buckets[0].max[1] + 32
            with pytest.raises(ShapeOutOfProfileError):
                lane.run(1, too_big, 32)  # refused here, before the server is asked
            assert remote.healthy and remote.describe()["kind"] == "remote fake"
        finally:
            remote.close()


def test_a_lost_engine_server_is_a_lost_device(
    engine_server: tuple[subprocess.Popen[bytes], Path], spec: ModelSpec, onnx_path: Path
) -> None:
    process, socket_path = engine_server
    remote = _remote(spec, onnx_path, socket_path)
    try:
        lane = remote.lanes(spec.buckets[0].id)[0]
        process.kill()
        process.wait()
        with pytest.raises(BackendError, match="engine server is gone"):
            lane.run(1, 64, 64)
        assert not remote.healthy
    finally:
        remote.close()


def test_a_worker_whose_spec_differs_from_the_server_is_refused(
    engine_server: tuple[subprocess.Popen[bytes], Path], spec: ModelSpec, onnx_path: Path
) -> None:
    _, socket_path = engine_server
    other = spec.model_copy(update={"buckets": spec.buckets[:2]})
    with pytest.raises(EngineLoadError, match="serves"):
        _remote(other, onnx_path, socket_path)


def test_supervised_workers_share_one_engine_and_a_killed_one_is_restarted(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    env = worker_env(redis_url, IMGWORKER_BACKEND__KIND="fake", IMGWORKER_BACKEND__FAKE__BATCH_MS="20")
    with WorkerProcess(env, "--processes", "2") as supervisor:
        supervisor.wait_ready(120)
        metrics = supervisor.metrics()
        workers = {dict(labels).get("worker") for (name, labels) in metrics if name == "imgworker_ready"}
        assert workers == {"worker-0", "worker-1"}
        child = next(line for line in supervisor.lines if "[worker-1]" in line and "consumer" in line)
        assert "[engine] " in supervisor.log and "remote fake" in supervisor.log
        consumer = child.split("consumer ")[1].split(",")[0]
        victim = int(consumer.rsplit("-", 2)[-2])  # hostname-pid-random
        with Client(redis_url) as client:
            ids = client.submit_many(photos[:60])
            time.sleep(0.3)
            subprocess.run(["kill", "-9", str(victim)], check=True)
            results = client.wait_many(ids, timeout_s=120)
        assert all(r.status == "ok" for r in results.values())
        lane_waits = sum(
            value
            for (name, labels), value in supervisor.metrics().items()
            if name == "imgworker_engine_step_seconds_count" and dict(labels).get("step") == "lane_wait"
        )
        assert lane_waits > 0, "the engine server's lane waits reach the workers' metrics"
        deadline = time.monotonic() + 30
        while "worker-1 exited with status -9; restarting" not in supervisor.log and time.monotonic() < deadline:
            time.sleep(0.1)
        supervisor.wait_ready(60)  # both workers again
        supervisor.process.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0, supervisor.log
    assert "worker-1 exited with status -9; restarting" in supervisor.log
    assert all(redis_client.xlen(s) == 0 for s in KEYS.streams)
