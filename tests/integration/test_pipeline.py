"""The pipeline in process (fake backend, real redis-server): outcomes, failures, windows, charging."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

import worker.client
from tests.conftest import all_settled, settings_for
from tests.support.faulty import POISON_BGR, FaultyFakeBackend
from tests.support.inprocess import serving
from tests.support.redis_server import RedisServer
from worker.backends import open_backend
from worker.backends.fake import FakeBackend
from worker.client import AsyncClient
from worker.core.buckets import ModelSpec, load_model_spec
from worker.core.metrics import Metrics
from worker.core.protocol import DEFAULT_PRIORITY, JobRequest, Keys
from worker.core.settings import Settings
from worker.pipeline.service import Service
from worker.transport.broker import Broker, GroupStats

KEYS = Keys()
POISON = cv2.imencode(".png", np.full((96, 64, 3), POISON_BGR, np.uint8))[1].tobytes()


def _doc(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.hget(KEYS.result(job_id), "json")
    return None if raw is None else json.loads(raw)  # type: ignore[arg-type]


def _faulty(settings: Settings, spec: ModelSpec, onnx_path: Path, mode: str) -> FaultyFakeBackend:
    backend = FaultyFakeBackend(spec, onnx_path, settings.backend)
    backend.mode = mode
    backend.open()
    return backend


async def test_every_job_answered_once_in_shared_batches(redis_url: str, photos: list[Path]) -> None:
    settings = settings_for(redis_url)
    async with serving(settings) as running, AsyncClient(redis_url) as client:
        ids = await client.submit_many(photos[:80])
        results = await client.wait_many(ids, timeout_s=120)
        stop_code = await running.stop()
    assert stop_code == 0
    assert all(r.status == "ok" for r in results.values())
    assert {r.result["attempts"] for r in results.values()} == {1}
    assert {r.result["worker"] for r in results.values()} == {settings.redis.consumer}
    sizes = [r.result["batch_size"] for r in results.values()]
    assert max(sizes) > 1, "jobs must have shared batches"
    timings = results[ids[0]].result["timings_ms"]
    assert {"queue", "decode_wait", "decode", "batch_wait", "inference", "postprocess", "total"} <= set(timings)
    sync = redis.Redis.from_url(redis_url)
    assert all_settled(sync)
    assert all(sync.llen(KEYS.done(j)) == 0 for j in ids)  # the waiter took each job's one notification


async def test_a_large_submission_goes_in_round_trips_of_bounded_size(
    redis_url: str, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big list is sent in chunks of at most SUBMIT_CHUNK_BYTES of images, in order: sent as one
    pipeline, 40,000 photos (1.7 GB) outlasted the socket timeout on the H200 machine and failed."""
    limit = sum(p.stat().st_size for p in photos[:3])
    monkeypatch.setattr(worker.client, "SUBMIT_CHUNK_BYTES", limit)
    round_trips: list[tuple[int, int]] = []  # (images, their bytes) of each
    async with AsyncClient(redis_url) as client:
        send = client._send

        async def counted(requests: list[JobRequest]) -> dict[str, str]:
            round_trips.append((len(requests), sum(len(r.image) for r in requests)))
            return await send(requests)

        monkeypatch.setattr(client, "_send", counted)
        ids = await client.submit_many(photos[:12])
        again = await client.submit_many(photos[:12], job_ids=ids)  # a retry after an error: nothing new
    assert again == ids
    assert sum(count for count, _ in round_trips) == 24 and len(round_trips) >= 8, round_trips
    assert all(size <= limit or count == 1 for count, size in round_trips), round_trips  # a big photo goes alone
    entries = redis.Redis.from_url(redis_url).xrange(KEYS.stream(DEFAULT_PRIORITY))
    assert [fields[b"id"].decode() for _, fields in entries] == ids


@pytest.mark.parametrize("mode", ["bug", "transient"])
async def test_a_failing_job_fails_alone_and_the_worker_keeps_serving(
    redis_url: str, photos: list[Path], spec: ModelSpec, onnx_path: Path, mode: str
) -> None:
    settings = settings_for(redis_url, redis={"max_deliveries": 2})
    backend = _faulty(settings, spec, onnx_path, mode)
    async with serving(settings, spec, backend) as running, AsyncClient(redis_url) as client:
        good = await client.submit_many(photos[:12])
        bad = await client.submit(POISON, job_id="poison")
        more = await client.submit_many(photos[12:20])
        results = await client.wait_many([*good, bad, *more], timeout_s=60)
        assert running.service.ready()
        assert await running.stop() == 0
    assert all(results[j].status == "ok" for j in [*good, *more])
    if mode == "bug":  # a bug is final: no retry
        assert (results[bad].code, results[bad].status) == ("internal_error", "error")
    else:  # transient: retried alone, then dead-lettered with the last error
        assert results[bad].code == "max_deliveries", results[bad].message
        assert "gave up after 2 failed attempts; last error: backend_error: a transient failure" in results[bad].message
        dead = redis.Redis.from_url(redis_url).xrange(KEYS.dead_letter())
        assert len(dead) == 1 and dead[0][1][b"job_id"] == b"poison" and dead[0][1][b"attempts"] == b"2"
    assert all_settled(redis.Redis.from_url(redis_url))


async def test_a_postprocessing_bug_fails_that_job_only(
    redis_url: str, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.pipeline import executor

    real = executor.text_boxes

    def text_boxes(prob: np.ndarray, *args: Any) -> Any:
        if prob.shape == (96, 64):  # the one small image of this test
            raise RuntimeError("a bug in postprocessing")
        return real(prob, *args)

    monkeypatch.setattr(executor, "text_boxes", text_boxes)
    async with serving(settings_for(redis_url)) as running, AsyncClient(redis_url) as client:
        ids = await client.submit_many([*photos[:6], POISON, *photos[6:12]])
        results = await client.wait_many(ids, timeout_s=60)
        assert running.service.ready() and len(running.service.inflight) == 0
    codes = [results[j].code for j in ids]
    assert codes == ["", "", "", "", "", "", "internal_error", "", "", "", "", "", ""]


async def test_a_lost_device_stops_the_worker_and_leaves_its_jobs(
    redis_url: str, photos: list[Path], spec: ModelSpec, onnx_path: Path
) -> None:
    settings = settings_for(redis_url)
    backend = _faulty(settings, spec, onnx_path, "sticky")
    async with serving(settings, spec, backend) as running, AsyncClient(redis_url) as client:
        await client.submit(POISON, job_id="poison")
        code = await asyncio.wait_for(running.task, 30)
        assert code == 1 and not running.service.ready()
    sync = redis.Redis.from_url(redis_url)
    assert _doc(sync, "poison") is None  # not settled: left for a healthy worker
    assert sum(sync.xlen(s) for s in KEYS.streams) == 1
    assert not sync.keys(KEYS.lease("*"))  # lease dropped: others may take it at once


async def test_a_hung_batch_is_detected_and_the_worker_exits(redis_url: str, spec: ModelSpec, onnx_path: Path) -> None:
    """A wedge counts as a death: the stuck job, uncharged, runs alone on the next worker; wedging
    that one too, alone, it is charged an attempt (``stalled``)."""
    settings = settings_for(redis_url, pipeline={"stall_s": 2})
    sync = redis.Redis.from_url(redis_url)
    backends = [_faulty(settings, spec, onnx_path, "hang") for _ in range(2)]
    try:
        for wedge, backend in enumerate(backends):
            started = time.monotonic()
            async with serving(settings, spec, backend) as running, AsyncClient(redis_url) as client:
                if wedge == 0:
                    await client.submit(POISON)
                code = await asyncio.wait_for(running.task, 30)
                waited = time.monotonic() - started
                assert code == 1 and running.service.health.wedged and not running.service.ready()
                assert not running.service.lanes_idle()  # the hung batch still holds its lane: never closed under it
            assert 2 <= waited < 10, f"wedge detected after {waited:.1f} s with stall_s 2"
            attempts = sync.hgetall(KEYS.attempts(KEYS.stream(1)))
            marked = sync.hgetall(KEYS.running(KEYS.stream(1), running.service.broker.consumer))
            if wedge == 0:  # in a batch (of one, but not run as a suspect): a death, charged to nobody yet
                assert not attempts and list(marked.values()) == [b"batched"], (attempts, marked)
            else:  # run alone: charged, with the reason
                entry = sync.xrange(KEYS.stream(1))[0][0]
                assert not marked and attempts[entry] == b"1" and attempts[entry + b":deaths"] == b"1", attempts
                assert attempts[entry + b":error"].startswith(b"stalled"), attempts
    finally:
        for backend in backends:
            backend.release.set()  # else the hung threads would hold the interpreter at exit


async def test_malformed_entries_get_one_error_each_and_never_wedge(redis_url: str, photos: list[Path]) -> None:
    """256 entries with a 5000-digit enqueued_ms (this wedged the worker before), then real work."""
    raw = aioredis.Redis.from_url(redis_url)
    stream = KEYS.stream(1)
    await raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    for i in range(256):
        await raw.xadd(stream, {"v": 1, "id": f"wedge-{i}", "image": b"x", "enqueued_ms": "9" * 5000})
    settings = settings_for(redis_url, pipeline={"max_inflight": 16})
    async with serving(settings) as running, AsyncClient(redis_url) as client:
        ids = await client.submit_many(photos[:10])
        results = await client.wait_many([*[f"wedge-{i}" for i in range(256)], *ids], timeout_s=60)
        stopped = time.monotonic()
        assert await running.stop() == 0
        assert time.monotonic() - stopped < 5
    assert all(results[f"wedge-{i}"].code == "invalid_job" for i in range(256))
    assert all(results[j].status == "ok" for j in ids)
    await raw.aclose()


async def test_ids_that_are_not_utf8_or_too_long_answer_under_the_entry_id(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    stream = KEYS.stream(1)
    raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    bad_utf8 = raw.xadd(stream, {"v": 1, "id": b"job-\xff\xfe", "image": POISON}).decode()
    too_long = raw.xadd(stream, {"v": 1, "id": "x" * 201, "image": POISON}).decode()
    fine = raw.xadd(stream, {"v": 1, "id": "j\u00e9-1", "image": POISON}).decode()
    async with serving(settings_for(redis_url)) as running:
        async with AsyncClient(redis_url) as client:
            results = await client.wait_many([bad_utf8, too_long, "j\u00e9-1"], timeout_s=30)
        await running.stop()
    assert results[bad_utf8].code == results[too_long].code == "invalid_job"
    assert results[bad_utf8].job_id == bad_utf8 and "UTF-8" in results[bad_utf8].message
    assert results["j\u00e9-1"].status == "ok" and fine
    assert not raw.keys(KEYS.result("job-*")) and not raw.keys(KEYS.result("x" * 200))  # no altered id anywhere


async def test_images_wait_beside_their_entries_and_go_with_them(redis_url: str, photos: list[Path]) -> None:
    """The enqueue script keeps each image out of its entry (the worker's read never copies it
    through Lua) in a key named after the entry; settling deletes it. An entry whose image is gone
    is answered as an invalid job, and the others run."""
    raw = redis.Redis.from_url(redis_url)
    stream = KEYS.stream(DEFAULT_PRIORITY)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many(photos[:6])
        entries = raw.xrange(stream)
        assert [fields[b"id"].decode() for _, fields in entries] == ids
        assert all(b"image" not in fields for _, fields in entries)
        assert [raw.get(KEYS.image(stream, e.decode())) for e, _ in entries] == [p.read_bytes() for p in photos[:6]]
        raw.delete(KEYS.image(stream, entries[2][0].decode()))
        async with serving(settings_for(redis_url)) as running:
            results = await client.wait_many(ids, timeout_s=60)
            await running.stop()
    assert results[ids[2]].code == "invalid_job"
    assert "no image is stored beside the entry" in results[ids[2]].message
    assert all(results[j].status == "ok" for j in ids if j != ids[2])
    assert all_settled(raw)


async def test_raw_xadd_duplicates_run_twice_and_the_first_settled_result_stays(redis_url: str) -> None:
    """Producers that bypass the enqueue script can add an id twice: one result, one notification."""
    raw = redis.Redis.from_url(redis_url)
    stream = KEYS.stream(1)
    raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    small = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1].tobytes()
    raw.xadd(stream, {"v": 1, "id": "twice", "image": POISON})
    raw.xadd(stream, {"v": 1, "id": "twice", "image": small})
    async with serving(settings_for(redis_url)) as running:
        deadline = time.monotonic() + 30
        while not all_settled(raw) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await running.stop()
    doc = _doc(raw, "twice")
    assert doc is not None and doc["status"] == "ok"
    assert doc["result"]["image"]["height"] in (96, 40)  # whichever settled first
    assert raw.llen(KEYS.done("twice")) == 1
    assert all_settled(raw)


@pytest.mark.parametrize("max_inflight", [None, 6])
async def test_read_ahead_stays_within_the_window(redis_url: str, photos: list[Path], max_inflight: int | None) -> None:
    """However many reads are on the wire at once (four here), what they bring never overflows the window."""
    settings = settings_for(
        redis_url,
        backend={"fake": {"batch_ms": 20}},
        pipeline={"max_inflight": max_inflight},
        redis={"concurrent_reads": 4},
    )
    async with serving(settings) as running, AsyncClient(redis_url) as client:
        window = running.service.inflight.capacity
        ids = await client.submit_many(photos * 2)
        peak = 0
        waiting = asyncio.create_task(client.wait_many(ids, timeout_s=120))
        while not waiting.done():
            peak = max(peak, len(running.service.inflight))
            pending = 0
            for stream in KEYS.streams:
                pending += (await client.redis.xpending(stream, "workers"))["pending"]
            assert pending <= window + 2, f"{pending} entries pending with a window of {window}"
            await asyncio.sleep(0.01)
        await waiting
    expected = max_inflight or sum(
        2 * 2 * b.max_batch for b in load_model_spec(settings.model_spec).buckets
    )  # two lanes a bucket
    assert window == expected and 0 < peak <= window


async def test_every_reader_waits_on_the_server_at_once(redis_url: str) -> None:
    """With nothing queued, each of ``concurrent_reads`` readers blocks in an XREADGROUP of its own: a
    busy server hands a large reply out 64 KB per turn of its loop, so only reads on the wire together
    keep a worker's intake up."""
    settings = settings_for(redis_url, redis={"concurrent_reads": 3, "block_ms": 1500})
    raw = redis.Redis.from_url(redis_url)
    seen: list[int] = []
    async with serving(settings):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not seen or seen[-1] < 3):
            clients = raw.client_list()
            seen.append(sum(1 for c in clients if c["cmd"] == "xreadgroup" and "b" in c["flags"]))
            await asyncio.sleep(0.05)
    assert max(seen) == 3, f"blocked reads seen at once: {sorted(set(seen))}"


@pytest.mark.parametrize("max_deliveries", [1, 3])
async def test_a_dead_worker_charges_only_the_job_it_ran_alone_and_its_suspects_run_alone(
    redis_url: str, photos: list[Path], max_deliveries: int
) -> None:
    """A consumer died holding 10 entries: 4 running in a batch, 1 running alone, 5 only read. The
    4 become suspects, uncharged, and run one at a time; the one run alone is charged an attempt
    (dead-lettered when that was its last); the 5 run as usual, in batches."""
    raw = redis.Redis.from_url(redis_url)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many([photos[0]] * 10)  # one shape: they can share batches
    stream = KEYS.stream(1)
    raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    entries = raw.xreadgroup("workers", "dead-worker", {stream: ">"}, count=10)[0][1]
    batched, alone = [e[0].decode() for e in entries[:4]], entries[4][0].decode()
    raw.hset(KEYS.running(stream, "dead-worker"), mapping={**dict.fromkeys(batched, "batched"), alone: "alone"})
    time.sleep(1.1)  # idle past half the 2 s lease, which the dead worker never held
    settings = settings_for(redis_url, redis={"max_deliveries": max_deliveries})
    async with serving(settings) as running, AsyncClient(redis_url) as client:
        results = await client.wait_many(ids, timeout_s=60)
        await running.stop()
    by_entry = {e[0].decode(): results[e[1][b"id"].decode()] for e in entries}
    for entry in batched:
        assert by_entry[entry].status == "ok" and by_entry[entry].result["attempts"] == 1, entry
        assert by_entry[entry].result["batch_size"] == 1, "a suspect runs alone"
    if max_deliveries == 1:
        assert by_entry[alone].code == "max_deliveries" and "worker_died" in by_entry[alone].message
    else:
        assert by_entry[alone].status == "ok" and by_entry[alone].result["attempts"] == 2
        assert by_entry[alone].result["batch_size"] == 1
    isolated = running.metrics.registry.get_sample_value("imgworker_isolated_runs_total")
    assert isolated == (4 if max_deliveries == 1 else 5), isolated  # out of attempts: dead-lettered, not run
    read_only = [e[0].decode() for e in entries[5:]]
    assert all(by_entry[e].status == "ok" and by_entry[e].result["attempts"] == 1 for e in read_only)
    assert max(by_entry[e].result["batch_size"] for e in read_only) > 1, "jobs never running in a death batch"
    assert not raw.hgetall(KEYS.attempts(stream)) and not raw.exists(KEYS.running(stream, "dead-worker"))


async def test_suspects_claimed_by_two_readers_at_once_run_alone_one_after_another(
    redis_url: str, photos: list[Path]
) -> None:
    """Two readers can each hold freshly claimed suspects (slow reclaims overlap while a master fails
    over): each set runs alone in its turn; each waiting for the other to be gone would wait forever."""
    raw = redis.Redis.from_url(redis_url)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many([photos[0]] * 4)
    stream = KEYS.stream(1)
    raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    entries = raw.xreadgroup("workers", "dead-worker", {stream: ">"}, count=4)[0][1]
    raw.hset(KEYS.running(stream, "dead-worker"), mapping={e[0].decode(): "batched" for e in entries})
    time.sleep(1.1)  # idle past half the 2 s lease, which the dead worker never held
    # claimed under the worker's name, they are its own entries: its readers leave them alone for the 30 s backoff
    settings = settings_for(redis_url, redis={"consumer": "worker-a", "retry_backoff_s": 30, "concurrent_reads": 2})
    claimer = Broker(settings.redis)
    try:
        await claimer.ensure_groups()
        suspects = await claimer.reclaim(set(), 10)
    finally:
        await claimer.aclose()
    assert len(suspects) == 4 and all(d.suspect for d in suspects)
    async with serving(settings) as running, AsyncClient(redis_url) as client:
        admit = running.service.intake._admit_all  # what each reader does with what its reclaim brought
        await asyncio.wait_for(asyncio.gather(admit(suspects[:2]), admit(suspects[2:])), 20)
        results = await client.wait_many(ids, timeout_s=30)
    assert all(r.status == "ok" and r.result["batch_size"] == 1 for r in results.values()), results
    assert running.metrics.registry.get_sample_value("imgworker_isolated_runs_total") == 4


async def test_a_stop_during_warm_up_ends_within_the_grace_period(redis_url: str) -> None:
    settings = settings_for(redis_url, backend={"fake": {"batch_ms": 3000}}, shutdown_grace_s=2)
    async with serving(settings, wait_ready=False) as running:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        running.service.stop()
        code = await asyncio.wait_for(running.task, 10)
        took = time.monotonic() - started
    assert code == 0 and took < 2, f"stop during warm-up took {took:.1f} s"


async def test_settling_rides_out_a_redis_restart(
    tmp_path: Path, photos: list[Path], spec: ModelSpec, onnx_path: Path
) -> None:
    """Redis dies after the jobs were read: they settle once it is back (AOF kept them)."""
    server = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        settings = settings_for(server.url, backend={"fake": {"batch_ms": 1500}})
        backend = FakeBackend(spec, onnx_path, settings.backend)
        backend.open()
        async with serving(settings, spec, backend) as running, AsyncClient(server.url) as client:
            ids = await client.submit_many(photos[:8])
            while len(running.service.inflight) < 8:
                await asyncio.sleep(0.01)
            server.stop()
            async with asyncio.timeout(10):
                while running.service.ready():  # readiness follows Redis
                    await asyncio.sleep(0.05)
            server.start()
            results = await client.wait_many(ids, timeout_s=60)
            await running.stop()
        assert all(r.status == "ok" for r in results.values())
        assert all_settled(server.client())
    finally:
        server.stop()


class _CancelLosingBroker(Broker):
    """Its first ``stats`` call is slow and loses the cancellation that ends it, as redis-py's
    asyncio client did with 36 of 200 cancels landing in a loop of XLEN calls (redis-py 8.1)."""

    lost = 0

    async def stats(self) -> dict[int, GroupStats]:
        if not self.lost:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.lost += 1
        return await super().stats()


async def test_a_burst_worker_ends_even_when_a_redis_call_loses_its_cancellation(
    redis_url: str, photos: list[Path], spec: ModelSpec
) -> None:
    settings = settings_for(redis_url)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many(photos[:8])
    backend = await asyncio.to_thread(open_backend, spec, settings.onnx_path(spec.onnx), settings.backend)
    broker = _CancelLosingBroker(settings.redis)
    try:
        service = Service(settings, spec, backend, broker, Metrics())
        task = asyncio.create_task(service.run(burst=True))
        ended, _ = await asyncio.wait({task}, timeout=30)
        if not ended:
            service.stop()  # lets the stuck loop go, so the test fails rather than hangs
            await task
        assert broker.lost == 1
        assert ended, "the burst finished but the worker did not end"
        assert task.result() == 0
    finally:
        await broker.aclose()
        backend.close()
    assert all_settled(redis.Redis.from_url(redis_url))
    assert all(_doc(redis.Redis.from_url(redis_url), j)["status"] == "ok" for j in ids)  # type: ignore[index]
