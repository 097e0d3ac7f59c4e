"""Batch decisions, driven by an injected clock: no test here depends on how fast the machine is."""

from __future__ import annotations

import asyncio

import pytest

from worker.core.buckets import BucketSpec
from worker.pipeline.batcher import Batcher

BUCKET = BucketSpec(id="b", min=(1, 32, 32), opt=(4, 64, 64), max=(8, 64, 64), max_wait_ms=80)
SQUARE = (64, 64)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _batcher(clock: Clock, shapes: dict[int, tuple[int, int]] | None = None) -> Batcher[int]:
    """Items are plain ints, all 64x64 unless ``shapes`` says otherwise."""
    return Batcher(BUCKET, lambda item: (shapes or {}).get(item, SQUARE), clock)


def _items(batch: list[tuple[float, int]]) -> list[int]:
    return [item for _, item in batch]


def test_flushes_at_opt_batch_without_waiting() -> None:
    clock = Clock()
    batcher = _batcher(clock)
    for i in range(3):
        batcher.put(i)
    batch, wait_s = batcher.take_ready()
    assert batch == [] and wait_s == pytest.approx(0.08)  # three of opt four: wait for the oldest's deadline
    batcher.put(3)
    batcher.put(4)
    assert _items(batcher.take_ready()[0]) == [0, 1, 2, 3, 4]  # opt reached: all waiting, up to max


def test_takes_at_most_max_batch_when_items_pile_up() -> None:
    batcher = _batcher(Clock())
    for i in range(20):
        batcher.put(i)
    assert [len(batcher.take_ready()[0]) for _ in range(3)] == [8, 8, 4]


def test_a_partial_batch_goes_at_the_deadline_of_its_oldest_item() -> None:
    clock = Clock()
    batcher = _batcher(clock)
    batcher.put(1)
    clock.now += 0.05
    batcher.put(2)
    assert batcher.take_ready() == ([], pytest.approx(0.03))
    clock.now += 0.031
    assert _items(batcher.take_ready()[0]) == [1, 2]


def test_mixed_shapes_do_not_count_toward_each_others_batch() -> None:
    """Four items of four shapes with opt 4 are four partial batches, not one full one."""
    clock = Clock()
    shapes = {0: (64, 64), 1: (32, 64), 2: (64, 32), 3: (32, 32)}
    batcher = _batcher(clock, shapes)
    for item in shapes:
        batcher.put(item)
    assert batcher.take_ready()[0] == []  # nothing is due: no shape has opt items
    clock.now += 0.08
    assert [_items(batcher.take_ready()[0]) for _ in shapes] == [[0], [1], [2], [3]]


def test_the_shape_whose_oldest_item_came_first_goes_first() -> None:
    clock = Clock()
    shapes = {i: (32, 64) for i in range(10, 14)}
    batcher = _batcher(clock, shapes)
    batcher.put(0)  # a square, oldest
    clock.now += 0.01
    for i in range(10, 14):
        batcher.put(i)  # four wide ones: opt reached for them
    assert _items(batcher.take_ready()[0]) == [10, 11, 12, 13]
    clock.now += 0.08
    assert _items(batcher.take_ready()[0]) == [0]


def test_a_high_priority_item_overtakes_the_queue_of_its_shape() -> None:
    """Items >= 100 are high priority (0), the rest low (2): twenty low ones wait for a lane when a
    high one arrives; the next batch takes it first, then the oldest low ones."""
    batcher: Batcher[int] = Batcher(BUCKET, lambda _: SQUARE, Clock(), priority_of=lambda i: 0 if i >= 100 else 2)
    for i in range(20):
        batcher.put(i)
    batcher.put(100)
    assert _items(batcher.take_ready()[0]) == [100, 0, 1, 2, 3, 4, 5, 6]
    assert _items(batcher.take_ready()[0]) == [7, 8, 9, 10, 11, 12, 13, 14]


def test_among_ready_shapes_the_one_holding_the_highest_priority_goes_first() -> None:
    clock = Clock()
    wide = (64, 32)
    batcher: Batcher[int] = Batcher(
        BUCKET, lambda i: wide if i >= 50 else SQUARE, clock, priority_of=lambda i: 0 if i == 99 else 1
    )
    for i in range(4):  # a full opt batch of squares, first
        batcher.put(i)
    clock.now += 0.01
    for i in (50, 51, 52, 99):  # then a full batch of wide ones, one of them high priority
        batcher.put(i)
    assert _items(batcher.take_ready()[0]) == [99, 50, 51, 52]
    assert _items(batcher.take_ready()[0]) == [0, 1, 2, 3]


async def test_close_flushes_remaining_then_ends() -> None:
    shapes = {0: (64, 64), 1: (32, 64), 2: (64, 64), 3: (32, 64), 4: (64, 64)}
    batcher = _batcher(Clock(), shapes)
    for item in shapes:
        batcher.put(item)
    batcher.close()
    first = _items(await batcher.next_batch())
    second = _items(await batcher.next_batch())
    assert first == [0, 2, 4] and second == [1, 3]  # arrival order kept within each shape
    assert await batcher.next_batch() == []


async def test_a_waiting_runner_wakes_when_opt_is_reached() -> None:
    batcher = _batcher(Clock())  # the injected clock never advances: only opt can release the batch
    batcher.put(0)
    waiting = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0)
    assert not waiting.done()
    for i in range(1, 4):
        batcher.put(i)
    assert _items(await asyncio.wait_for(waiting, 5)) == [0, 1, 2, 3]
