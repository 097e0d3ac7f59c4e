"""Shared fixtures: a real redis-server per session on a free port, the real model and photos."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.buckets import ModelSpec, load_model_spec
from worker.settings import REPO_CONFIG_DIR, Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server process; tests may stop and restart it (same port) to cut Redis off."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    path = Settings().assets_dir
    if not (path / "photos" / ".complete").is_file():
        pytest.fail(f"assets missing in {path}: run `python -m worker fetch-assets` (the test script does)")
    return path


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return load_model_spec(REPO_CONFIG_DIR / "ppocr_det.yaml")


@pytest.fixture(scope="session")
def onnx_path(assets_dir: Path, spec: ModelSpec) -> Path:
    return Settings().onnx_path(spec.onnx)


@pytest.fixture(scope="session")
def photos(assets_dir: Path) -> list[Path]:
    return sorted(p for p in (assets_dir / "photos").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


@pytest.fixture(scope="session")
def edge_dir(assets_dir: Path) -> Path:
    return assets_dir / "edge"


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: quick leases and retries so fault tests run fast."""
    env = dict(os.environ)
    env.update(
        {
            "IMGWORKER_REDIS__URL": redis_url,
            "IMGWORKER_METRICS__PORT": "0",
            "IMGWORKER_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env
