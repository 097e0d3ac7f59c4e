from __future__ import annotations

import asyncio
import time

from worker.batcher import Batcher
from worker.buckets import BucketSpec

BUCKET = BucketSpec(id="b", min=(1, 32, 32), opt=(4, 64, 64), max=(8, 64, 64), max_wait_ms=80)
SQUARE = (64, 64)


def _batcher() -> Batcher[int]:
    """Items are plain ints, all 64x64, unless a test gives sizes."""
    return Batcher(BUCKET, lambda _: SQUARE)


async def test_flushes_at_opt_batch_without_waiting() -> None:
    batcher = _batcher()
    for i in range(5):
        batcher.put(i)
    started = time.monotonic()
    batch = await batcher.next_batch()
    assert [item for _, item in batch] == [0, 1, 2, 3, 4]  # all waiting, up to max
    assert time.monotonic() - started < 0.05


async def test_takes_at_most_max_batch_when_items_pile_up() -> None:
    batcher = _batcher()
    for i in range(20):
        batcher.put(i)
    sizes = [len(await batcher.next_batch()) for _ in range(3)]
    assert sizes == [8, 8, 4]


async def test_a_partial_batch_waits_for_max_wait_of_its_oldest_item() -> None:
    batcher = _batcher()
    batcher.put(1)
    started = time.monotonic()
    batch = await batcher.next_batch()
    waited = time.monotonic() - started
    assert [item for _, item in batch] == [1]
    assert waited >= 0.075  # never before the deadline


async def test_a_late_arrival_completing_opt_flushes_before_the_deadline() -> None:
    batcher = _batcher()
    batcher.put(0)

    async def add_rest() -> None:
        await asyncio.sleep(0.01)
        for i in range(1, 4):
            batcher.put(i)

    started = time.monotonic()
    _, batch = await asyncio.gather(add_rest(), batcher.next_batch())
    assert len(batch) == 4 and time.monotonic() - started < 0.07


async def test_close_flushes_remaining_then_ends() -> None:
    batcher = _batcher()
    batcher.put(1)
    batcher.put(2)
    batcher.close()
    started = time.monotonic()
    assert [item for _, item in await batcher.next_batch()] == [1, 2]
    assert await batcher.next_batch() == []
    assert time.monotonic() - started < 0.05


async def test_only_items_of_one_padded_shape_share_a_batch() -> None:
    shapes = {0: (64, 64), 1: (32, 64), 2: (64, 64), 3: (32, 64), 4: (64, 64)}
    batcher: Batcher[int] = Batcher(BUCKET, shapes.__getitem__)
    for item in shapes:
        batcher.put(item)
    batcher.close()
    first = [item for _, item in await batcher.next_batch()]
    second = [item for _, item in await batcher.next_batch()]
    assert first == [0, 2, 4] and second == [1, 3]  # arrival order kept within each shape
    assert await batcher.next_batch() == []
