"""The pipeline, composed: intake (what to hold next) → admission (parse, decode on the CPU pool)
→ per-bucket batchers → one runner per lane (``execution``) → postprocess → settle (``settler``).
``health`` watches it; ``lifecycle`` is the stop and the task group every stage spawns into.

Every task runs in one TaskGroup: a task that dies takes the worker down with exit status 1, so it
is restarted rather than left wedged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from worker.backends.base import Backend
from worker.core.buckets import ModelSpec
from worker.core.errors import BrokerError, ConfigError, StalledError
from worker.core.logs import Outage
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.pipeline.admission import Admission
from worker.pipeline.execution import Execution
from worker.pipeline.health import Health
from worker.pipeline.inflight import Inflight
from worker.pipeline.intake import Intake
from worker.pipeline.lifecycle import EXIT_MARGIN_S, Lifecycle
from worker.pipeline.settler import Marks, Settler
from worker.transport.broker import Broker
from worker.transport.connection import until_answered

logger = logging.getLogger(__name__)


class _Finished(Exception):  # noqa: N818 - a signal, not an error
    """Ends the service's TaskGroup once draining is over (the idiom for cancelling its other tasks)."""


class Service:
    """Owns the stages, the pools and the task group; signals and HTTP belong to ``worker.lifespan``."""

    def __init__(self, settings: Settings, spec: ModelSpec, backend: Backend, broker: Broker, metrics: Metrics) -> None:
        self.settings = settings
        self.broker = broker
        self.lifecycle = Lifecycle(settings.shutdown_grace_s)
        self._cpu_pool = ThreadPoolExecutor(settings.pipeline.decode_threads, thread_name_prefix="cpu")
        # entries: about two batches per lane, so a killed worker orphans few jobs and a stop drains
        # in seconds; bytes: one image as large as allowed (plus the entry that crosses it)
        window = settings.pipeline.max_inflight or sum(2 * len(backend.lanes(b.id)) * b.max_batch for b in spec.buckets)
        self.inflight = Inflight(window, settings.pipeline.max_image_bytes)
        self.settler = Settler(broker, self.inflight, metrics)
        marks = Marks(broker, metrics)
        self.execution = Execution(
            spec, backend, settler=self.settler, marks=marks, metrics=metrics, lifecycle=self.lifecycle,
            cpu_pool=self._cpu_pool, consumer=settings.redis.consumer,
        )  # fmt: skip
        admission = Admission(
            settings=settings.pipeline, spec=spec, backend=backend, batchers=self.execution.batchers,
            settler=self.settler, marks=marks, metrics=metrics, lifecycle=self.lifecycle, cpu_pool=self._cpu_pool,
        )  # fmt: skip
        self.intake = Intake(
            settings=settings, broker=broker, inflight=self.inflight, settler=self.settler, marks=marks,
            admission=admission, metrics=metrics, lifecycle=self.lifecycle,
        )  # fmt: skip
        self.health = Health(
            self.lifecycle, broker, backend, self.inflight, metrics,
            lease_s=settings.redis.lease_s, stall_s=settings.pipeline.stall_s,
        )  # fmt: skip
        metrics.inflight.set_function(lambda: len(self.inflight))
        metrics.inflight_capacity.set(window)
        self.lifecycle.on_stop(self._on_stop)

    def ready(self) -> bool:
        return self.health.ready()

    def lanes_idle(self) -> bool:
        return self.execution.idle()

    def stop(self) -> None:
        self.lifecycle.stop()

    def _on_stop(self) -> None:
        logger.info("stopping: no new jobs, settling %d in flight", len(self.inflight))
        self.health.publish()
        self.inflight.wake()

    async def run(self, burst: bool = False) -> int:
        """Serve until stopped (or, with ``burst``, until nothing is queued or in flight)."""
        try:
            async with asyncio.TaskGroup() as group:
                self.lifecycle.bind(group)
                group.create_task(self._serve(burst))
        except BaseExceptionGroup as group_error:
            _, failures = group_error.split(_Finished)
            if failures is not None:
                first = failures.exceptions[0]
                if isinstance(first, ConfigError):
                    raise first from None
                logger.error("a pipeline task failed; exiting so the worker is restarted", exc_info=first)
                self.lifecycle.exit_code = 1
        finally:
            await self._leave_the_rest()
            self.execution.shutdown()
            self._cpu_pool.shutdown(wait=False, cancel_futures=True)
            self.health.publish()
        return self.lifecycle.exit_code

    async def _serve(self, burst: bool) -> None:
        if await self._until_redis(self.broker.ensure_groups) and await self._until_redis(self.broker.heartbeat):
            self.health.spawn_loops()
            finished, _ = await self.lifecycle.unless_stopped(self.execution.warm_up())
            if finished:
                self.health.warm = True
                self.health.publish()
                runners = self.execution.start()
                await self.intake.run(burst)
                await self._drain(runners)
        # The background loops end on this as well as on the group's cancellation: redis-py's asyncio
        # client can lose a cancellation that lands inside a call, and a loop that lost it would
        # keep the group, and with it the process, alive after a burst.
        self.lifecycle.stop()
        raise _Finished

    async def _until_redis(self, call: Callable[[], Awaitable[object]]) -> bool:
        """A start-up call until Redis answers (True) or a stop comes (False)."""
        answered, _ = await until_answered(
            call,
            Outage(logger, "connecting to redis"),
            pause=self.lifecycle.pause,
            stopped=lambda: self.lifecycle.stopping,
        )
        if answered:
            self.health.set_redis(True)
        return answered

    async def _drain(self, runners: list[asyncio.Task[None]]) -> None:
        """After a burst, finish and settle everything held. After a stop, hand back what no lane
        has started (other workers take it at once, nothing charged) and finish the batches
        running; either until the grace period runs out."""
        left = self.lifecycle.deadline - time.monotonic() if self.lifecycle.stopping else None

        async def everything() -> None:
            if self.lifecycle.stopping and (unstarted := self.execution.take_unstarted()):
                self.lifecycle.spawn(self.settler.leave(unstarted))  # back to the streams at once
            while self.lifecycle.admissions:
                await asyncio.gather(*self.lifecycle.admissions, return_exceptions=True)
            self.execution.close()
            await asyncio.gather(*runners)
            while others := self.lifecycle.tasks - set(runners):
                await asyncio.gather(*others, return_exceptions=True)

        try:
            async with asyncio.timeout(left):
                await everything()
        except TimeoutError:
            logger.warning("grace period over with %d jobs unsettled; they are left for others", len(self.inflight))

    async def _leave_the_rest(self) -> None:
        """Entries still held go back uncharged, except what wedged the pipeline.

        A wedge counts as a death: stuck entries stay marked running, so whoever reclaims them
        makes them suspects that run alone; a suspect that wedged it alone is charged here.
        """
        for task in list(self.lifecycle.tasks):
            task.cancel()
        stuck = self.health.stuck
        stuck_keys = {d.key for d in stuck}
        held = [d for d in self.inflight.deliveries() if d.key not in stuck_keys]
        if culprits := [d for d in stuck if d.suspect]:
            stall = StalledError(f"held over stall_s {self.settings.pipeline.stall_s:.0f} s: the pipeline wedged")
            try:
                await asyncio.wait_for(self.settler.retry_later([(d, stall) for d in culprits]), EXIT_MARGIN_S)
            except TimeoutError:
                logger.warning("could not charge the job that wedged the pipeline: redis does not answer")
        if held:
            await self.settler.leave(held)
        try:
            await self.broker.release()
        except BrokerError as exc:
            logger.warning("could not release the lease: %s", exc)
