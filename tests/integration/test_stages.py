"""Stages in process, against a real redis-server, outside the Service: intake's rules (a recording
admission stands in for decoding; Redis, the broker and the window are real) and health's
watchdog (an injected clock)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis

from tests.conftest import settings_for
from worker.client import AsyncClient
from worker.core.metrics import Metrics
from worker.core.protocol import Delivery, Keys
from worker.pipeline.inflight import Inflight
from worker.pipeline.intake import Intake
from worker.pipeline.lifecycle import Lifecycle
from worker.pipeline.settler import Marks, Settler
from worker.transport.broker import Broker

KEYS = Keys()


class _Admitted:
    """Admission that keeps what it is given (held, never released): what intake decided to run."""

    def __init__(self) -> None:
        self.batches: list[list[Delivery]] = []

    def admit(self, deliveries: list[Delivery]) -> None:
        self.batches.append(list(deliveries))


class _RecordingBroker(Broker):
    """Records, as each read is sent, the room the window had promised away by then."""

    inflight: Inflight
    sent: list[tuple[int, int]]

    async def read(self, count: int, nbytes: int, largest: int) -> list[Delivery]:
        self.sent.append((count, self.inflight.reserved))
        return await super().read(count, nbytes, largest)


def _intake(redis_url: str, capacity: int, **redis_settings: object) -> tuple[Intake, _RecordingBroker, _Admitted]:
    settings = settings_for(redis_url, redis=redis_settings)
    broker = _RecordingBroker(settings.redis)
    inflight = Inflight(capacity, settings.pipeline.max_image_bytes)
    broker.inflight, broker.sent = inflight, []
    admitted = _Admitted()
    metrics = Metrics()
    intake = Intake(
        settings=settings, broker=broker, inflight=inflight, settler=Settler(broker, inflight, metrics),
        marks=Marks(broker, metrics), admission=admitted,  # type: ignore[arg-type]
        metrics=metrics, lifecycle=Lifecycle(settings.shutdown_grace_s),
    )  # fmt: skip
    return intake, broker, admitted


async def test_every_read_reserves_its_room_before_it_is_sent(redis_url: str, photos: list[Path]) -> None:
    """Four readers at once over a window of 10: each asks only for room no other read has
    promised, so what they bring together never overruns the window."""
    async with AsyncClient(redis_url) as client:
        await client.submit_many(photos[:4] * 10)
    intake, broker, admitted = _intake(redis_url, capacity=10, concurrent_reads=4)
    await broker.ensure_groups()
    try:
        intake._large_entries = False  # small photos: the readers may be on the wire together
        intake._next_reclaim = float("inf")  # no reclaim due: reads only
        await asyncio.gather(*(intake._read_and_admit(burst=False) for _ in range(4)))
    finally:
        await broker.aclose()
    held = sum(len(batch) for batch in admitted.batches)
    assert [count for count, _ in broker.sent] == [3, 3, 3, 1]  # shares of 10 by 4 readers, the rest
    assert all(reserved == count + before for (count, reserved), before in zip(broker.sent, (0, 3, 6, 9), strict=True))
    assert held == 10 == len(intake._inflight)


async def test_a_reclaim_that_fills_its_room_goes_first_again(redis_url: str, photos: list[Path]) -> None:
    """A dead worker left 12 entries; the window has room for 5. Each reclaim fills it, so the next
    turn reclaims again before any new entry is read: left entries (older) come back first."""
    async with AsyncClient(redis_url) as client:
        left_ids = await client.submit_many(photos[:12], priority=1)
    raw = redis.Redis.from_url(redis_url)
    stream = KEYS.stream(1)
    raw.xgroup_create(stream, "workers", id="0", mkstream=True)
    raw.xreadgroup("workers", "dead-worker", {stream: ">"}, count=12)
    async with AsyncClient(redis_url) as client:
        await client.submit_many(photos[12:20], priority=1)  # new entries, queued behind
    time.sleep(1.1)  # idle past half the 2 s lease the dead worker never held
    intake, broker, admitted = _intake(redis_url, capacity=5)
    await broker.ensure_groups()
    try:
        await intake._read_and_admit(burst=False)
        first = [d for batch in admitted.batches for d in batch]
        intake._inflight.release(first)  # as if settled: room for 5 more
        await intake._read_and_admit(burst=False)
    finally:
        await broker.aclose()
    taken = [d for batch in admitted.batches for d in batch]
    assert len(first) == 5 and len(taken) == 10
    assert all(d.deliveries == 2 for d in taken), "both turns reclaimed; no new entry was read"
    assert not broker.sent
    assert {d.fields[b"id"].decode() for d in taken} <= set(left_ids)


async def test_the_watchdog_stops_a_wedged_pipeline_with_exit_status_1(redis_url: str) -> None:
    """An entry held past stall_s (an injected clock moves time) means a wedge: not ready, stopped at
    once with nothing to drain, exit status 1, and the stuck entry kept for leaving as a death."""
    from worker.backends import open_backend
    from worker.core.buckets import load_model_spec
    from worker.pipeline.health import Health

    settings = settings_for(redis_url, pipeline={"stall_s": 10})
    spec = load_model_spec(settings.model_spec)
    backend = await asyncio.to_thread(open_backend, spec, settings.onnx_path(spec.onnx), settings.backend)
    now = [100.0]
    inflight = Inflight(8, 1 << 20, clock=lambda: now[0])
    lifecycle = Lifecycle(settings.shutdown_grace_s)
    broker = Broker(settings.redis)
    health = Health(lifecycle, broker, backend, inflight, Metrics(), lease_s=2, stall_s=10)
    health.warm = health.redis_ok = True
    entry = Delivery("imgworker:jobs:1", "1-0", {b"id": b"job"}, 1)
    inflight.hold(entry)
    try:
        async with asyncio.TaskGroup() as group:
            lifecycle.bind(group)
            health.spawn_loops()
            await asyncio.sleep(0.05)
            assert health.ready() and not lifecycle.stopping
            now[0] += 11
            async with asyncio.timeout(5):
                while not lifecycle.stopping:
                    await asyncio.sleep(0.05)
    finally:
        await broker.aclose()
        backend.close()
    assert health.wedged and not health.ready() and health.stuck == [entry]
    assert lifecycle.exit_code == 1 and lifecycle.deadline <= time.monotonic()
