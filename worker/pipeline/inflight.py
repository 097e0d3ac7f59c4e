"""The entries a worker holds: a bounded table that is its read-ahead window and its drain signal.

The window is bounded twice: by entries, and by the bytes they hold (a few large photos must not
cost what a window of small ones does).

Every held entry is released exactly once (settled, left for a retry, or left for others at a
stop); how long entries have been held is what the watchdog reads to tell a wedged pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.core.protocol import Delivery


class Inflight:
    def __init__(self, capacity: int, byte_capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.byte_capacity = byte_capacity
        self._clock = clock
        self._held: dict[str, tuple[Delivery, float]] = {}
        self.held_bytes = 0
        #: tasks waiting for a change, each on its own future
        self._waiters: set[asyncio.Future[None]] = set()
        #: room promised to reads still on the wire: what they return is held, never more
        self.reserved = 0
        self.reserved_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: str) -> bool:
        return key in self._held

    @property
    def free(self) -> int:
        """Entries a read may ask for: none while the bytes are spent."""
        return max(self.capacity - len(self._held) - self.reserved, 0) if self.free_bytes > 0 else 0

    @property
    def free_bytes(self) -> int:
        return max(self.byte_capacity - self.held_bytes - self.reserved_bytes, 0)

    def keys(self) -> set[str]:
        return set(self._held)

    def deliveries(self) -> list[Delivery]:
        return [delivery for delivery, _ in self._held.values()]

    def hold(self, delivery: Delivery) -> None:
        if delivery.key in self._held:
            raise RuntimeError(f"entry {delivery.key} is held already")
        self._held[delivery.key] = (delivery, self._clock())
        self.held_bytes += delivery.nbytes

    def release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            if (held := self._held.pop(delivery.key, None)) is not None:
                self.held_bytes -= held[0].nbytes
        self.wake()

    @contextmanager
    def reserving(self, room: int, nbytes: int = 0) -> Iterator[None]:
        """``room`` entries and ``nbytes`` kept from ``free`` while a read is on the wire. Whoever
        reserved holds what came before it next awaits, so the window is never overrun (by bytes,
        by at most the entry that crosses the reservation); room left unused wakes the others."""
        self.reserved += room
        self.reserved_bytes += nbytes
        try:
            yield
        finally:
            self.reserved -= room
            self.reserved_bytes -= nbytes
            self.wake()

    def held_longer_than(self, seconds: float) -> list[Delivery]:
        now = self._clock()
        return [delivery for delivery, taken in self._held.values() if now - taken > seconds]

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate`` holds; it is checked again after every ``wake`` (entries released...)."""
        while not predicate():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)

    def wake(self) -> None:
        """Every waiter checks its predicate again, once the caller next yields: a caller may still
        change the table (hold what a read brought) before anyone looks."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
