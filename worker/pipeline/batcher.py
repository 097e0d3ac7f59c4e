"""Per-bucket dynamic batching, one queue per padded shape (a batch holds one shape; see ``ResizeSpec``).

A free runner takes a batch from a shape as soon as ``opt_batch`` items of that shape wait (the size
the profile is tuned for) or that shape's oldest item has waited ``max_wait_ms``; while runners are
busy, items pile up to ``max_batch``, the most one batch may take.

Priority holds inside the worker too: a batch takes its shape's higher-priority items first, and
among shapes ready at once the one holding the highest priority goes first (then the one whose
oldest item came first). A high-priority job read while hundreds of low-priority ones wait for a
lane overtakes them instead of waiting for the whole window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

from worker.core.buckets import BucketSpec

T = TypeVar("T")
Shape = tuple[int, int]


class Batcher(Generic[T]):
    """A bucket's queues. Runners call ``next_batch`` only when idle, which is what makes opt preferred."""

    def __init__(
        self,
        bucket: BucketSpec,
        shape_of: Callable[[T], Shape],
        clock: Callable[[], float] = time.monotonic,
        priority_of: Callable[[T], int] = lambda _: 0,
    ) -> None:
        self.bucket = bucket
        self._shape_of = shape_of
        self._priority_of = priority_of
        self._clock = clock
        #: per shape, per priority (0 first), (enqueue time, item) in arrival order
        self._queues: OrderedDict[Shape, dict[int, deque[tuple[float, T]]]] = OrderedDict()
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return sum(len(q) for by_priority in self._queues.values() for q in by_priority.values())

    def put(self, item: T) -> None:
        if self._closed:
            raise RuntimeError(f"batcher {self.bucket.id} is closed")
        by_priority = self._queues.setdefault(self._shape_of(item), {})
        by_priority.setdefault(self._priority_of(item), deque()).append((self._clock(), item))
        self._changed.set()

    def take_all(self) -> list[T]:
        """Everything queued, removed: what a stop hands back instead of running."""
        items = [item for by_priority in self._queues.values() for queue in by_priority.values() for _, item in queue]
        self._queues.clear()
        return items

    def close(self) -> None:
        """Flush what is queued without waiting, then make ``next_batch`` return empty."""
        self._closed = True
        self._changed.set()

    def take_ready(self) -> tuple[list[tuple[float, T]], float | None]:
        """A batch if one is due now, else the seconds until the next one is (None: nothing queued)."""
        now = self._clock()
        max_wait_s = self.bucket.max_wait_ms / 1000.0
        due: tuple[int, float, Shape] | None = None  # (highest priority held, oldest item, shape)
        next_deadline: float | None = None
        for shape, by_priority in self._queues.items():
            oldest = min(queue[0][0] for queue in by_priority.values())
            waiting = sum(len(queue) for queue in by_priority.values())
            if self._closed or waiting >= self.bucket.opt_batch or now - oldest >= max_wait_s:
                candidate = (min(by_priority), oldest, shape)
                if due is None or candidate[:2] < due[:2]:
                    due = candidate
            else:
                deadline = oldest + max_wait_s - now
                next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
        if due is None:
            return [], next_deadline
        by_priority = self._queues[due[2]]
        batch: list[tuple[float, T]] = []
        for priority in sorted(by_priority):
            queue = by_priority[priority]
            while queue and len(batch) < self.bucket.max_batch:
                batch.append(queue.popleft())
            if not queue:
                del by_priority[priority]
        if not by_priority:
            del self._queues[due[2]]
        return batch, None

    async def next_batch(self) -> list[tuple[float, T]]:
        """The next batch as (enqueue time, item) pairs; empty once closed and drained."""
        while True:
            batch, wait_s = self.take_ready()
            if batch:
                return batch
            if self._closed:
                return []
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
