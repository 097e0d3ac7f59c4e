"""Per-bucket dynamic batching: flush at max batch, at opt batch when a runner is free, or at max wait;
a batch holds items of one padded shape only (see ``ResizeSpec``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from worker.buckets import BucketSpec

T = TypeVar("T")


class Batcher(Generic[T]):
    """A bucket's queue. Runners call ``next_batch`` only when idle, which is what makes opt preferred.

    A free runner takes a batch as soon as ``opt_batch`` items wait (the size the profile is tuned
    for) or the oldest item has waited ``max_wait_ms``; while runners are busy, items pile up to
    ``max_batch``, the most one batch may take.
    """

    def __init__(self, bucket: BucketSpec, shape_of: Callable[[T], tuple[int, int]]) -> None:
        self.bucket = bucket
        self._shape_of = shape_of
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Event()
        self._closed = False

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
        """The oldest item and, in arrival order, later items of the same shape, up to max batch."""
        shape = self._shape_of(self._items[0][1])
        chosen: list[tuple[float, T]] = []
        rest: deque[tuple[float, T]] = deque()
        for entry in self._items:
            if len(chosen) < self.bucket.max_batch and self._shape_of(entry[1]) == shape:
                chosen.append(entry)
            else:
                rest.append(entry)
        self._items = rest
        return chosen

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
