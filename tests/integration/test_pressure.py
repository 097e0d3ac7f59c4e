"""Redis under pressure, against real redis-server processes: full memory, a frozen server, keys
that are not what the protocol expects, and what a producer sees of each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import redis

from tests.conftest import FAST_LEASE_ENV, REPO
from tests.support.redis_server import RedisServer, free_port
from tests.support.workers import WorkerProcess, worker_env
from worker.client import Client, SubmitError
from worker.core.errors import BrokerError
from worker.core.protocol import FOREIGN_RESULT_KEY, Keys

pytestmark = pytest.mark.slow
KEYS = Keys()
FAKE = {"IMGWORKER_BACKEND__KIND": "fake"}
MIB = 1 << 20


def _distinct_jpegs(photos: list[Path], count: int, size: tuple[int, int] = (480, 360)) -> list[bytes]:
    """``count`` JPEGs that all differ (a pixel each), so no two derive the same job id."""
    sources = [cv2.resize(cv2.imread(str(p)), size) for p in photos[:20]]
    images = []
    for i in range(count):
        image = sources[i % len(sources)].copy()
        image[0, 0] = (i % 256, i // 256 % 256, 7)
        images.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return images


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _enqueue(url: str, *paths: Path | str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "worker", "enqueue", "--redis-url", url, "--json", *map(str, paths)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)


def test_a_full_redis_refuses_producers_early_and_the_worker_still_drains_it(
    tmp_path: Path, photos: list[Path]
) -> None:
    """Over maxmemory (noeviction) Redis refuses every ordinary write. Settling is what frees memory,
    so the worker's scripts run there too; producers are refused with the figures, and every job
    already queued gets its result."""
    server = RedisServer(tmp_path)
    server.start()
    raw = server.client()
    try:
        with Client(server.url) as client:
            job_ids = client.submit_many(_distinct_jpegs(photos, 300))
            raw.config_set("maxmemory", _used(raw) - 2 * MIB)  # past the limit: only allow-oom scripts write
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                raw.set("plain-write", "refused")
            with pytest.raises(SubmitError) as refused:
                client.submit_many(_distinct_jpegs(photos, 3))
            message = str(refused.value)
            assert "out of memory" in message and "MiB of its maxmemory" in message, message
            assert refused.value.stored == [] and len(refused.value.failed) == 3

            with WorkerProcess(worker_env(server.url, **FAST_LEASE_ENV, **FAKE)) as worker:
                results = client.gather(job_ids, timeout_s=120)
                worker.process.send_signal(signal.SIGTERM)
                assert worker.wait(30) == 0, worker.log
            print(f"at the limit: {len(results)} of {len(job_ids)} results, used {_used(raw) / MIB:.1f} MiB")
            assert len(results) == len(job_ids) and {r.status for r in results.values()} == {"ok"}
            assert sum(int(raw.xlen(s)) for s in KEYS.streams) == 0
            assert "settle failed" not in worker.log and "intake failed" not in worker.log, worker.log[-3000:]
            # settling freed the images: producers are welcome again
            assert len(client.submit_many(_distinct_jpegs(photos, 3))) == 3
    finally:
        server.stop()


def test_enqueue_says_what_became_of_every_input_and_a_rerun_enqueues_nothing_twice(
    tmp_path: Path, photos: list[Path]
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    raw = server.client()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    images = _distinct_jpegs(photos, 200)
    for i, data in enumerate(images):
        (inputs / f"{i:03d}.jpg").write_bytes(data)
    chunk = sum(len(d) for d in images[:64])
    try:
        raw.config_set("maxmemory", int((_used(raw) + 1.5 * chunk) / 0.9))  # room for about one chunk
        first = _enqueue(server.url, inputs)
        lines = [json.loads(line) for line in first.stdout.splitlines()]
        queued = [line for line in lines if line["status"] == "queued"]
        refused = [line for line in lines if line["code"] == "not_stored"]
        print(f"first run: exit {first.returncode}, {len(queued)} queued, {len(refused)} not stored")
        assert first.returncode == 3 and len(lines) == len(images), first.stderr
        assert queued and refused and len(queued) + len(refused) == len(images)
        assert all("out of memory" in line["message"] or "not sent" in line["message"] for line in refused)
        assert any("MiB of its maxmemory" in line["message"] for line in refused), refused[0]
        assert sum(int(raw.xlen(s)) for s in KEYS.streams) == len(queued)

        raw.config_set("maxmemory", 0)
        second = _enqueue(server.url, inputs)
        assert second.returncode == 0, second.stderr
        again = {line["path"]: line["job_id"] for line in map(json.loads, second.stdout.splitlines())}
        assert all(again[line["path"]] == line["job_id"] for line in queued)  # the same jobs, named again
        assert sum(int(raw.xlen(s)) for s in KEYS.streams) == len(images)  # none of them twice
    finally:
        server.stop()


def test_an_unreachable_redis_is_named_within_seconds(tmp_path: Path, photos: list[Path]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    run = _enqueue(url, photos[0])
    elapsed = time.monotonic() - started
    print(f"enqueue against nothing: exit {run.returncode} after {elapsed:.1f} s: {run.stderr.strip()}")
    assert run.returncode == 3 and elapsed < 20
    assert f"cannot reach Redis at {url}" in run.stderr and "Traceback" not in run.stderr
    [line] = [json.loads(line) for line in run.stdout.splitlines()]
    assert line["code"] == "not_stored" and "cannot reach Redis" in line["message"]
    with Client(url) as client, pytest.raises(BrokerError, match="cannot reach Redis"):
        client.submit(photos[0])


def test_readiness_follows_a_frozen_redis_within_seconds(tmp_path: Path, photos: list[Path]) -> None:
    """SIGSTOP freezes redis-server under load: ordinary calls ride it out on their retries, but
    /readyz must say so at once, and the worker must log each change once."""
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    env = worker_env(server.url, **FAST_LEASE_ENV, **FAKE, IMGWORKER_BACKEND__FAKE__IMAGE_MS="20")
    try:
        with Client(server.url) as client, WorkerProcess(env) as worker:
            worker.wait_ready()
            job_ids = client.submit_many(_distinct_jpegs(photos, 400, size=(320, 240)))
            os.kill(server.process.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            while worker.get("/readyz")[0] == 200:
                assert time.monotonic() - frozen < 10, "/readyz stayed 200 with Redis frozen"
                time.sleep(0.1)
            down_s = time.monotonic() - frozen
            time.sleep(max(0.0, 8 - down_s))
            os.kill(server.process.pid, signal.SIGCONT)
            resumed = time.monotonic()
            while worker.get("/readyz")[0] != 200:
                assert time.monotonic() - resumed < 10, "/readyz stayed 503 with Redis back"
                time.sleep(0.1)
            up_s = time.monotonic() - resumed
            results = client.gather(job_ids, timeout_s=120)
            log = worker.log
        print(f"frozen: /readyz 503 after {down_s:.1f} s; resumed: 200 after {up_s:.1f} s; {len(results)} results")
        assert down_s < 4 and up_s < 4
        assert len(results) == len(job_ids), log[-5000:]
        assert log.count("does not answer") == 1, log[-3000:]
        assert log.count("redis answers") == 2, log[-3000:]  # at start, and once Redis is back
    finally:
        server.stop()


def test_a_result_key_of_another_type_ends_its_job_in_the_dead_letters_and_is_left_alone(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    """A result key the protocol did not write (another type, or a hash without a result) is not an
    answer: the job is dead-lettered with the reason, the key is left as it was, and clients
    collect every other result and report that job's error."""
    redis_client.set(KEYS.result("foreign-string"), "not ours")
    redis_client.hset(KEYS.result("foreign-hash"), "owner", "someone else")
    job_ids = ["foreign-string", "foreign-hash", "fine-1", "fine-2"]
    with Client(redis_url) as client:
        client.submit_many(_distinct_jpegs(photos, len(job_ids)), job_ids=job_ids)
        with WorkerProcess(worker_env(redis_url, **FAST_LEASE_ENV, **FAKE)) as worker:
            results = client.gather(job_ids, timeout_s=60)
            deadline = time.monotonic() + 60
            while sum(int(redis_client.xlen(s)) for s in KEYS.streams):
                assert time.monotonic() < deadline, "jobs were never settled"
                time.sleep(0.1)
            single = client.wait("foreign-hash", timeout_s=5)
            metrics = worker.metrics()
    assert set(results) == set(job_ids)
    assert {results[j].status for j in ("fine-1", "fine-2")} == {"ok"}
    for job_id in ("foreign-string", "foreign-hash"):
        assert (results[job_id].status, results[job_id].code) == ("error", FOREIGN_RESULT_KEY), results[job_id]
    assert single.code == FOREIGN_RESULT_KEY
    assert redis_client.get(KEYS.result("foreign-string")) == b"not ours"
    assert redis_client.hgetall(KEYS.result("foreign-hash")) == {b"owner": b"someone else"}
    dead = [fields for _, fields in redis_client.xrange(KEYS.dead_letter())]
    assert sorted(f[b"result_key"].decode() for f in dead) == sorted(
        KEYS.result(j) for j in ("foreign-hash", "foreign-string")
    )
    assert all(f[b"code"] == FOREIGN_RESULT_KEY.encode() for f in dead)
    assert metrics[("imgworker_dead_lettered_total", (("code", FOREIGN_RESULT_KEY),))] == 2
    assert "not a result hash" in worker.log
