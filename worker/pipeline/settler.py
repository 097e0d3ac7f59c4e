"""Settling: final results stored and acknowledged, failed jobs charged and left for a retry.

Each call retries while Redis is away and is never cancelled halfway (shielded); the entries are
released from the in-flight table only once Redis has them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from worker.core.errors import BrokerError, WorkerError
from worker.core.logs import Outage
from worker.core.metrics import Metrics
from worker.core.protocol import FOREIGN_RESULT_KEY, Delivery, Settlement
from worker.pipeline.inflight import Inflight
from worker.transport.broker import Broker
from worker.transport.connection import until_answered

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Settler:
    def __init__(self, broker: Broker, inflight: Inflight, metrics: Metrics) -> None:
        self.broker = broker
        self.inflight = inflight
        self.metrics = metrics
        self._keys = broker.keys
        self._outages = {what: Outage(logger, what) for what in ("settle", "charging attempts")}

    async def _until_done(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` until Redis takes it, never cancelled halfway (shielded)."""
        _, result = await until_answered(lambda: asyncio.shield(call()), self._outages[what])
        return result  # type: ignore[return-value]  # never stopped: None only after a stop

    async def settle(self, settlements: Sequence[Settlement], dead: bool = False) -> None:
        """Store results and acknowledge them in one round trip (dead letters copied first)."""
        if not settlements:
            return
        started = time.perf_counter()
        settled = await self._until_done("settle", lambda: self.broker.settle(settlements, dead))
        self.metrics.settle.observe(time.perf_counter() - started)
        foreign = {id(s) for s in settled.foreign}
        for s in settled.foreign:
            logger.error(
                "job %s: its result key %s is not a result hash; left as it is, the job is dead-lettered",
                s.result.job_id,
                self._keys.result(s.result.job_id, self._keys.shard_of_stream(s.delivery.stream)),
            )
            self.metrics.jobs_completed.labels("error", FOREIGN_RESULT_KEY).inc()
            self.metrics.dead_lettered.labels(FOREIGN_RESULT_KEY).inc()
        end_ms = time.time() * 1000
        for s in settlements:
            if id(s) in foreign:
                continue
            self.metrics.jobs_completed.labels(s.result.status, s.result.code).inc()
            if s.enqueued_ms:
                priority = self._keys.priority_of(s.delivery.stream)
                self.metrics.end_to_end.labels(s.bucket, priority).observe(max(end_ms - s.enqueued_ms, 0) / 1000)
            if dead:
                self.metrics.dead_lettered.labels(s.result.code).inc()
        self.inflight.release([s.delivery for s in settlements])

    async def retry_later(self, failed: Sequence[tuple[Delivery, WorkerError]]) -> None:
        """Charge each an attempt and leave it pending: retried after the backoff, or dead-lettered."""
        if not failed:
            return
        charged = [(delivery, f"{error.code}: {error}") for delivery, error in failed]
        await self._until_done("charging attempts", lambda: self.broker.retry_later(charged))
        for _, error in failed:
            self.metrics.retries.labels(error.code).inc()
        self.inflight.release([delivery for delivery, _ in failed])

    async def leave(self, deliveries: Sequence[Delivery]) -> None:
        """Left for other workers by a stop, nothing charged: entries never tried go back to their
        streams at once, the others (a failure or a death already counted) stay pending for the
        next worker to claim. One try: a stop does not wait for Redis."""
        fresh = [d for d in deliveries if not d.attempts and not d.deaths]
        counted = [d for d in deliveries if d.attempts or d.deaths]
        try:
            if fresh:
                await self.broker.hand_back(fresh)
            if counted:
                await self.broker.mark(waiting=counted)
        except BrokerError as exc:
            logger.warning("could not hand back %d entries (they stay pending for others): %s", len(deliveries), exc)
        self.inflight.release(list(deliveries))


class Marks:
    """Which held entries are running and which only wait, as Redis must know it to charge a death
    fairly: decoded entries queue here, and each batch marks itself running and them waiting in one
    round trip before it takes its lane (as do reclaimed entries and suspects when they are held).
    If Redis does not answer, they run unmarked (a death then charges nothing for them) rather than
    wait: left held and never run they would fill the window, and settling waits for Redis anyway."""

    def __init__(self, broker: Broker, metrics: Metrics) -> None:
        self._broker = broker
        self._metrics = metrics
        self._waiting: list[Delivery] = []
        self._marking = asyncio.Lock()

    def waiting(self, delivery: Delivery) -> None:
        self._waiting.append(delivery)

    async def running(self, deliveries: list[Delivery]) -> None:
        started = time.perf_counter()
        async with self._marking:  # in order: a later batch's marks must not land before an earlier one's
            waiting, self._waiting = self._waiting, []
            try:
                await self._broker.mark(running=deliveries, waiting=waiting)
                self._metrics.mark.observe(time.perf_counter() - started)
            except BrokerError as exc:
                logger.debug("could not mark %d entries running: %s", len(deliveries), exc)
                self._waiting = waiting + self._waiting
