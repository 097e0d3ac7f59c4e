"""Requests from many threads served together, in batches as large as what waits, by one thread.

A device unit that is fast on large batches and slow on many small concurrent ones (the GPU's JPEG
engines: a dozen decoders taking 16 images each at once gave an H200 a third of what one decoder
gives in batches of 64) is best fed by one thread: each lane's request waits in a queue, and while
one batch is served the next gathers every request that arrived meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Request(Generic[Item, Result]):
    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.results: list[Result] = []
        self.error: BaseException | None = None
        self.done = threading.Event()


class Coalescer(Generic[Item, Result]):
    """``submit`` blocks until ``serve`` has run on its items, together with other callers' items
    (whole requests, at most ``capacity`` items a batch), and returns its own results, in order.
    A failure of ``serve`` is raised in every caller whose items were in that batch."""

    def __init__(self, serve: Callable[[list[Item]], list[Result]], capacity: int, name: str) -> None:
        self._serve = serve
        self.capacity = capacity
        #: the most items served in one batch so far: how much the callers' requests were merged
        self.largest_batch = 0
        self._queue: queue.SimpleQueue[_Request[Item, Result] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued for the serving thread, not yet in a batch."""
        return self._queue.qsize()

    def submit(self, items: Sequence[Item]) -> list[Result]:
        if len(items) > self.capacity:
            raise ValueError(f"{len(items)} items do not fit a batch of {self.capacity}")
        if self._closed:
            raise RuntimeError("the coalescer is closed")
        request: _Request[Item, Result] = _Request(list(items))
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.results

    def close(self) -> None:
        """After the last ``submit`` has returned: stops the serving thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        held: deque[_Request[Item, Result] | None] = deque()  # a request that did not fit the last batch
        while True:
            first = held.popleft() if held else self._queue.get()
            if first is None:
                return
            batch, count = [first], len(first.items)
            while True:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None or count + len(waiting.items) > self.capacity:
                    held.append(waiting)
                    break
                batch.append(waiting)
                count += len(waiting.items)
            self._run(batch, count)

    def _run(self, batch: list[_Request[Item, Result]], count: int) -> None:
        self.largest_batch = max(self.largest_batch, count)
        try:
            results = self._serve([item for request in batch for item in request.items])
            if len(results) != count:
                raise RuntimeError(f"served {count} items, got {len(results)} results")
        except Exception as exc:
            for request in batch:
                request.error = exc
                request.done.set()
            return
        start = 0
        for request in batch:
            request.results = results[start : start + len(request.items)]
            start += len(request.items)
            request.done.set()
