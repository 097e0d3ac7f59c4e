"""Delivery under faults: kill -9 mid-batch, poison jobs, SIGTERM drain, duplicates, deadlines, Redis loss."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from tests.conftest import all_settled
from tests.support.faulty import POISON_BGR
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess, worker_env
from worker.client import Client
from worker.core.protocol import JobResult, Keys

pytestmark = pytest.mark.slow
KEYS = Keys()
FAST_LEASE = {
    "IMGWORKER_REDIS__LEASE_S": "2",
    "IMGWORKER_REDIS__BLOCK_MS": "200",
    "IMGWORKER_REDIS__RETRY_BACKOFF_S": "0.3",
}


def _results(client: redis.Redis, job_ids: list[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    out = {}
    for job_id in job_ids:
        raw = client.hget(KEYS.result(job_id), "json")
        if raw is not None:
            out[job_id] = json.loads(raw)  # type: ignore[arg-type]
    return out


def test_kill_9_mid_batch_loses_no_job(redis_url: str, redis_client: redis.Redis, photos: list[Path]) -> None:
    with Client(redis_url) as client:
        job_ids = client.submit_many(photos[:60])
    first = WorkerProcess(worker_env(redis_url, **FAST_LEASE))
    try:
        first.wait_ready()
        deadline = time.monotonic() + 120
        while len(_results(redis_client, job_ids)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_before = len(_results(redis_client, job_ids))
        pending_before = sum(redis_client.xpending(s, "workers")["pending"] for s in KEYS.streams)
        first.process.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        first.kill()
    assert 0 < done_before < len(job_ids) and pending_before > 0, "the kill must land mid-run"

    second = WorkerProcess(worker_env(redis_url, **FAST_LEASE), "--burst")
    assert second.wait(300) == 0, second.log
    results = _results(redis_client, job_ids)
    assert len(results) == len(job_ids)
    assert all(r["status"] == "ok" for r in results.values())
    for job_id in job_ids:  # nobody waited on them: exactly one notification each means one final result
        assert redis_client.llen(KEYS.done(job_id)) == 1
    redelivered = [r for r in results.values() if r["result"]["deliveries"] == 2]
    assert redelivered, "jobs the dead worker held must have been reclaimed"
    assert "claimed" in second.log
    assert all_settled(redis_client)


def test_a_job_that_always_fails_is_dead_lettered_after_max_deliveries(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    poison = cv2.imencode(".png", np.full((96, 64, 3), POISON_BGR, np.uint8))[1].tobytes()
    with Client(redis_url) as client:
        good = client.submit_many(photos[:6])
        bad = client.submit(poison, job_id="poison-1")
    env = worker_env(
        redis_url,
        IMGWORKER_BACKEND__KIND="tests.support.faulty:PoisonColourBackend",
        IMGWORKER_REDIS__MAX_DELIVERIES="3",
        **FAST_LEASE,
    )
    worker = WorkerProcess(env, "--burst")
    assert worker.wait(300) == 0, worker.log
    results = _results(redis_client, [*good, bad])
    assert all(results[j]["status"] == "ok" for j in good)
    assert (results[bad]["status"], results[bad]["code"]) == ("error", "max_deliveries")
    assert "last error: backend_error: refusing a batch" in results[bad]["message"]
    dead = redis_client.xrange(KEYS.dead_letter())
    assert len(dead) == 1
    entry = {k.decode(): v for k, v in dead[0][1].items()}
    assert entry["job_id"] == b"poison-1" and entry["deliveries"] == b"3" and entry["code"] == b"max_deliveries"
    assert entry["job.image"] == poison  # the original job travels with it, ready to replay
    assert worker.log.count("job poison-1 failed") == 3
    assert all_settled(redis_client)


def test_sigterm_drains_in_flight_work_without_redelivery(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    with Client(redis_url) as client:
        job_ids = client.submit_many(photos[:80])
    worker = WorkerProcess(worker_env(redis_url, IMGWORKER_PIPELINE__MAX_INFLIGHT="24"))
    try:
        worker.wait_ready()
        while not _results(redis_client, job_ids):
            time.sleep(0.05)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.kill()
    assert sum(redis_client.xpending(s, "workers")["pending"] for s in KEYS.streams) == 0  # nothing left claimed
    settled_by_first = len(_results(redis_client, job_ids))
    assert settled_by_first < len(job_ids), "the stop must land mid-queue"

    rest = WorkerProcess(worker_env(redis_url), "--burst")
    assert rest.wait(300) == 0, rest.log
    results = _results(redis_client, job_ids)
    assert len(results) == len(job_ids)
    assert all(r["result"]["deliveries"] == 1 for r in results.values())
    assert all_settled(redis_client)


def test_a_stop_hands_back_what_no_lane_started_and_exits_within_seconds(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    """On the CPU backend, a few images a second, a full in-flight window would take longer to run
    than Kubernetes' 30 s grace period: a stop finishes only the batches running and hands the rest
    back to the streams, so another worker runs them at once, delivered once, nothing charged."""
    with Client(redis_url) as client:
        job_ids = client.submit_many(photos[:150])
    worker = WorkerProcess(worker_env(redis_url))
    try:
        worker.wait_ready()
        while len(_results(redis_client, job_ids)) < 3:
            time.sleep(0.05)
        held = int(worker.metrics()[("imgworker_inflight_jobs", ())])
        worker.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert worker.wait(60) == 0, worker.log
        took = time.monotonic() - sent
    finally:
        worker.kill()
    first = len(_results(redis_client, job_ids))
    figure = f"a stop holding {held} entries exited in {took:.1f} s, {first} of 150 done by then"
    print(figure)
    assert took < 10 and held > 20 and first < 150, figure
    assert sum(redis_client.xpending(s, "workers")["pending"] for s in KEYS.streams) == 0, figure
    rest = WorkerProcess(worker_env(redis_url, IMGWORKER_BACKEND__KIND="fake"), "--burst")
    assert rest.wait(300) == 0, rest.log
    results = _results(redis_client, job_ids)
    assert len(results) == len(job_ids)
    assert all(r["result"]["deliveries"] == 1 and r["result"]["attempts"] == 1 for r in results.values())
    assert all_settled(redis_client)


def test_duplicate_job_ids_run_once_and_late_jobs_expire(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    with Client(redis_url) as client:
        first = client.submit(photos[0], job_id="order-42")
        again = client.submit(photos[1], job_id="order-42")
        late = client.submit(photos[2], deadline_s=0.001)
        time.sleep(0.01)
        assert first == again == "order-42"
        assert sum(redis_client.xlen(s) for s in KEYS.streams) == 2
        worker = WorkerProcess(worker_env(redis_url), "--burst")
        assert worker.wait(120) == 0, worker.log
        results = client.wait_many([first, late], timeout_s=5)
    assert results[first].status == "ok"
    assert results[first].result["image"]["width"] == cv2.imread(str(photos[0])).shape[1]  # the first submission ran
    assert (results[late].status, results[late].code) == ("error", "expired")


def test_worker_rides_out_a_redis_restart(redis_server: RedisServer, redis_url: str, photos: list[Path]) -> None:
    worker = WorkerProcess(worker_env(redis_url, **FAST_LEASE))
    try:
        worker.wait_ready()
        redis_server.stop()
        deadline = time.monotonic() + 30
        while worker.get("/readyz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.get("/readyz")[0] == 503  # not ready while Redis is away
        redis_server.start()  # empty: streams and group are gone too
        with Client(redis_url) as client:
            job_ids = client.submit_many(photos[:5])
            try:
                results = client.wait_many(job_ids, timeout_s=30)
            except TimeoutError:
                raise AssertionError(worker.log) from None
        assert all(r.status == "ok" for r in results.values())
        worker.wait_ready(30)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.kill()


def test_high_priority_jobs_overtake_a_low_priority_backlog(
    redis_url: str, redis_client: redis.Redis, photos: list[Path]
) -> None:
    with Client(redis_url) as client:
        low = client.submit_many(photos[:30], priority=2)
        high = client.submit_many(photos[30:42], priority=0)
    worker = WorkerProcess(worker_env(redis_url, IMGWORKER_PIPELINE__MAX_INFLIGHT="4"), "--burst")
    assert worker.wait(300) == 0, worker.log
    results = _results(redis_client, [*low, *high])
    queue_ms = {j: r["result"]["timings_ms"]["queue"] for j, r in results.items()}
    # Enqueued last, read first: no low job is read while high ones wait, so even the last high
    # job waited less than the sixth low one (reading all streams alike would interleave them).
    assert max(queue_ms[j] for j in high) < sorted(queue_ms[j] for j in low)[5]


def _store_ok_results(redis_client: redis.Redis, job_ids: list[str]) -> None:
    """Stores results as the settle script does: the result hash and its one notification."""
    pipe = redis_client.pipeline(transaction=False)
    for job_id in job_ids:
        fields = JobResult(job_id=job_id, status="ok").encode()
        pipe.hset(KEYS.result(job_id), items=[x for kv in fields.items() for x in kv])
        pipe.rpush(KEYS.done(job_id), "ok")
    pipe.execute()


def test_a_waiter_takes_the_notifications_of_results_stored_before_it_waited(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A result found by looking, not by a notification, still has its notification taken: none is
    left in Redis until the result's expiry (CI once found one after a fast job)."""
    ids = [f"early-{i}" for i in range(50)]
    _store_ok_results(redis_client, ids)
    with Client(redis_url) as client:
        results = client.gather(ids, timeout_s=10)
    assert len(results) == len(ids)
    assert not any(redis_client.exists(KEYS.done(j)) for j in ids)


def test_a_waiter_collects_bursts_of_results_with_few_blocking_calls(redis_url: str, redis_client: redis.Redis) -> None:
    """Results stored in bursts while ``gather`` waits: one wake-up collects every notification of its
    window, so a waiter's calls (and redis-server's work for them) do not grow with the results."""
    ids = [f"burst-{i}" for i in range(1200)]

    def produce() -> None:
        time.sleep(0.3)  # the waiter is blocked by then
        for start in range(0, len(ids), 100):
            _store_ok_results(redis_client, ids[start : start + 100])
            time.sleep(0.02)

    redis_client.config_resetstat()
    producer = threading.Thread(target=produce)
    producer.start()
    with Client(redis_url) as client:
        results = client.gather(ids, timeout_s=60)
    producer.join()
    blocking_calls = redis_client.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0)
    assert len(results) == len(ids) and {r.status for r in results.values()} == {"ok"}
    assert not any(redis_client.exists(KEYS.done(j)) for j in ids), "every notification consumed"
    assert 1 <= blocking_calls <= len(ids) // 10, f"{blocking_calls} BLPOPs for {len(ids)} results"
