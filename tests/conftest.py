"""Shared fixtures: real redis-server processes on free ports, the real model and photos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.corpus import sample_photos
from tests.support.redis_server import RedisServer
from tests.support.workers import REPO, worker_env
from worker.core.buckets import ModelSpec, load_model_spec
from worker.core.protocol import IMAGE_KEY_INFIX, Keys
from worker.core.settings import DEFAULT_SPEC, Settings

#: quick leases and retries, so fault tests run in seconds
FAST_REDIS = {"lease_s": 2.0, "block_ms": 200, "retry_backoff_s": 0.3}
FAST_LEASE_ENV = {
    "IMGWORKER_REDIS__LEASE_S": "2",
    "IMGWORKER_REDIS__BLOCK_MS": "200",
    "IMGWORKER_REDIS__RETRY_BACKOFF_S": "0.3",
}


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
    if not (path / "photos" / ".complete").is_file() or not (path / "edge" / ".complete").is_file():
        pytest.fail(f"test material missing in {path}: run `python -m worker fetch-assets --test-material`")
    return path


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return load_model_spec(DEFAULT_SPEC)


@pytest.fixture(scope="session")
def onnx_path(assets_dir: Path, spec: ModelSpec) -> Path:
    return Settings().onnx_path(spec.onnx)


@pytest.fixture(scope="session")
def photos(assets_dir: Path) -> list[Path]:
    return sample_photos(assets_dir)


@pytest.fixture(scope="session")
def edge_dir(assets_dir: Path) -> Path:
    return assets_dir / "edge"


def settings_for(redis_url: str, **sections: Any) -> Settings:
    """Explicit settings for an in-process worker: fast leases, the fake backend, no metrics port."""
    redis_section = {"url": redis_url, **FAST_REDIS, **sections.pop("redis", {})}
    backend = {"kind": "fake", **sections.pop("backend", {})}
    metrics = {"enabled": False, **sections.pop("metrics", {})}
    return Settings.load(redis=redis_section, backend=backend, metrics=metrics, **sections)


def all_settled(client: redis.Redis) -> bool:
    """Every stream of the default layout empty, nothing pending, and no image left beside an
    entry: what a settled queue leaves in Redis."""
    keys = Keys()
    streams_done = all(client.xlen(s) == 0 and client.xpending(s, "workers")["pending"] == 0 for s in keys.streams)
    return streams_done and not client.keys(f"{keys.prefix}*{IMAGE_KEY_INFIX}*")


__all__ = ["REPO", "RedisServer", "all_settled", "settings_for", "worker_env"]
