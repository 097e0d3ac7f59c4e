"""Settling: final results stored and acknowledged, failed jobs charged and left for a retry.

Each call retries while Redis is away and is never cancelled halfway (shielded); the entries are
released from the in-flight table only once Redis has them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from worker.broker import Broker
from worker.errors import BrokerError, WorkerError
from worker.inflight import Inflight
from worker.metrics import Metrics
from worker.protocol import Delivery, Settlement

logger = logging.getLogger(__name__)
BROKER_RETRY_S = 0.5


class Settler:
    def __init__(
        self, broker: Broker, inflight: Inflight, metrics: Metrics, redis_state: Callable[[bool], None]
    ) -> None:
        self.broker = broker
        self.inflight = inflight
        self.metrics = metrics
        self._redis_state = redis_state
        self._keys = broker.keys

    async def _until_done(self, what: str, call: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await asyncio.shield(call())
                self._redis_state(True)
                return
            except BrokerError as exc:
                self._redis_state(False)
                logger.warning("%s failed, retrying: %s", what, exc)
                await asyncio.sleep(BROKER_RETRY_S)

    async def settle(self, settlements: Sequence[Settlement], dead: bool = False) -> None:
        """Store results and acknowledge them in one round trip (dead letters copied first)."""
        if not settlements:
            return
        started = time.perf_counter()
        await self._until_done("settle", lambda: self.broker.settle(settlements, dead))
        self.metrics.settle.observe(time.perf_counter() - started)
        end_ms = time.time() * 1000
        for s in settlements:
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
        """Left for other workers by a stop: nothing charged. One try: a stop does not wait for Redis."""
        try:
            await self.broker.mark(waiting=deliveries)
        except BrokerError as exc:
            logger.warning("could not unmark %d entries left pending: %s", len(deliveries), exc)
        self.inflight.release(list(deliveries))
