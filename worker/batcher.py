"""Per-bucket dynamic batching: flush at max batch, at opt batch when a runner is free, or at max wait."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Generic, TypeVar

from worker.buckets import BucketSpec

T = TypeVar("T")


class Batcher(Generic[T]):
    """A bucket's queue. Runners call ``next_batch`` only when idle, which is what makes opt preferred.

    A free runner takes a batch as soon as ``opt_batch`` items wait (the size the profile is tuned
    for) or the oldest item has waited ``max_wait_ms``; while runners are busy, items pile up to
    ``max_batch``, the most one batch may take.
    """

    def __init__(self, bucket: BucketSpec) -> None:
        self.bucket = bucket
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        if self._closed:
            raise RuntimeError(f"batcher {self.bucket.id} is closed")
        self._items.append((time.monotonic(), item))
        self._changed.set()

    def close(self) -> None:
        """Flush what is queued without waiting, then make ``next_batch`` return empty."""
        self._closed = True
        self._changed.set()

    def _take(self) -> list[tuple[float, T]]:
        count = min(len(self._items), self.bucket.max_batch)
        return [self._items.popleft() for _ in range(count)]

    async def next_batch(self) -> list[tuple[float, T]]:
        """The next batch as (enqueue time, item) pairs; empty once closed and drained."""
        max_wait_s = self.bucket.max_wait_ms / 1000.0
        while True:
            if len(self._items) >= self.bucket.opt_batch or (self._closed and self._items):
                return self._take()
            if self._closed:
                return []
            timeout = None
            if self._items:
                timeout = self._items[0][0] + max_wait_s - time.monotonic()
                if timeout <= 0:
                    return self._take()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
