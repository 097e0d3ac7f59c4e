"""What every stage of a running worker shares: the stop, pauses that a stop cuts short, and
spawning into the service's task group. Stages take a ``Lifecycle``, never the ``Service``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: kept back from the grace period for leaving entries and dropping the lease
EXIT_MARGIN_S = 1.0


class Lifecycle:
    def __init__(self, grace_s: float) -> None:
        self._grace_s = grace_s
        self._stopping = asyncio.Event()
        #: when draining must end: set by a stop
        self.deadline = float("inf")
        #: 1 once a stage has failed for good (a wedge, an unusable backend): the worker is restarted
        self.exit_code = 0
        self._on_stop: list[Callable[[], None]] = []
        self._group: asyncio.TaskGroup | None = None
        #: every spawned task, and the admissions among them (what a drain waits for first)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.admissions: set[asyncio.Task[Any]] = set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def on_stop(self, callback: Callable[[], None]) -> None:
        self._on_stop.append(callback)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop reading; what is in flight is finished and settled within the grace period."""
        if not self._stopping.is_set():
            grace = self._grace_s - EXIT_MARGIN_S if grace_s is None else grace_s
            self.deadline = time.monotonic() + grace
            self._stopping.set()
            for callback in self._on_stop:
                callback()
        elif grace_s is not None:
            self.deadline = min(self.deadline, time.monotonic() + grace_s)

    def fail(self, message: str, grace_s: float | None = None) -> None:
        """A stage cannot go on: stop with exit status 1, so the worker is restarted."""
        if self.exit_code == 0:
            logger.error(message)
            self.exit_code = 1
        self.stop(grace_s)

    async def unless_stopped(self, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
        """(True, result) if it finished first, (False, None) if a stop came first (it is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        return False, None

    async def pause(self, seconds: float) -> None:
        """Sleep, waking early on a stop."""
        await self.unless_stopped(asyncio.sleep(seconds))

    def bind(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def spawn(self, coro: Coroutine[Any, Any, Any], *, admission: bool = False) -> asyncio.Task[Any]:
        """A task of the service's group that a drain waits for: should it raise (a bug), the worker
        exits 1 and is restarted."""
        task = self.spawn_loop(coro)
        for tasks in (self.tasks, self.admissions) if admission else (self.tasks,):
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return task

    def spawn_loop(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task of the service's group that runs until the stop (a drain does not wait for it)."""
        assert self._group is not None, "spawned before the service runs"
        return self._group.create_task(coro)
