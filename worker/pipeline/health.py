"""Whether a worker is fit to serve, told from inside: readiness (Redis answers, lanes warm, the
backend healthy), the lease's heartbeat, stream statistics, and the watchdog for a wedged pipeline."""

from __future__ import annotations

import logging

from worker.backends.base import Backend
from worker.core.errors import BrokerError
from worker.core.logs import Outage
from worker.core.metrics import Metrics
from worker.core.protocol import Delivery
from worker.pipeline.inflight import Inflight
from worker.pipeline.lifecycle import Lifecycle
from worker.transport.broker import Broker
from worker.transport.connection import PROBE_TIMEOUT_S

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0
PROBE_INTERVAL_S = 1.0
WATCHDOG_INTERVAL_S = 1.0


class Health:
    def __init__(
        self,
        lifecycle: Lifecycle,
        broker: Broker,
        backend: Backend,
        inflight: Inflight,
        metrics: Metrics,
        *,
        lease_s: float,
        stall_s: float,
    ) -> None:
        self._lifecycle = lifecycle
        self._broker = broker
        self._backend = backend
        self._inflight = inflight
        self._metrics = metrics
        self._lease_s = lease_s
        self._stall_s = stall_s
        self.warm = False
        self.redis_ok = False
        self.wedged = False
        #: entries the watchdog found held past stall_s: left marked running, as if this worker died
        self.stuck: list[Delivery] = []

    def ready(self) -> bool:
        return (
            self.warm and self.redis_ok and self._backend.healthy and not self.wedged and not self._lifecycle.stopping
        )

    def publish(self) -> None:
        self._metrics.ready.set(1 if self.ready() else 0)

    def set_redis(self, ok: bool) -> None:
        """Readiness follows the probe alone; each change is logged once."""
        if ok != self.redis_ok:
            if ok:
                logger.info("redis answers: ready")
            else:
                logger.warning("redis does not answer within %.1f s: not ready", PROBE_TIMEOUT_S)
        self.redis_ok = ok
        self.publish()

    def spawn_loops(self) -> None:
        for loop in (self._probe_loop, self._heartbeat_loop, self._stats_loop, self._watchdog_loop):
            self._lifecycle.spawn_loop(loop())

    async def _probe_loop(self) -> None:
        """Readiness: Redis answers a PING on its own connection within PROBE_TIMEOUT_S."""
        while not self._lifecycle.stopping:
            self.set_redis(await self._broker.answers())
            await self._lifecycle.pause(PROBE_INTERVAL_S)

    async def _heartbeat_loop(self) -> None:
        outage = Outage(logger, "heartbeat")
        while not self._lifecycle.stopping:
            await self._lifecycle.pause(self._lease_s / 3)
            try:
                await self._broker.heartbeat()
                outage.recovered()
            except BrokerError as exc:
                outage.failed(exc)

    async def _stats_loop(self) -> None:
        while not self._lifecycle.stopping:
            try:
                for priority, stats in (await self._broker.stats()).items():
                    self._metrics.stream_length.labels(priority).set(stats.length)
                    self._metrics.stream_lag.labels(priority).set(stats.lag)
                    self._metrics.stream_pending.labels(priority).set(stats.pending)
            except BrokerError as exc:
                logger.debug("stats failed: %s", exc)
            await self._lifecycle.pause(STATS_INTERVAL_S)

    async def _watchdog_loop(self) -> None:
        """A job held past ``stall_s`` means the pipeline is wedged: not ready, exit 1, left for others."""
        while not self._lifecycle.stopping:
            self.publish()
            if stuck := self._inflight.held_longer_than(self._stall_s):
                self.wedged = True
                self.stuck = stuck
                self._lifecycle.fail(
                    f"pipeline wedged: {len(stuck)} jobs held over stall_s {self._stall_s:.0f} s; exiting, "
                    "they will run alone elsewhere",
                    grace_s=0,  # nothing to drain into a wedged pipeline
                )
                return
            await self._lifecycle.pause(WATCHDOG_INTERVAL_S)
