"""Intake: what to hold next. ``concurrent_reads`` readers share the in-flight window; every so
often a reclaim takes back what dead workers left; suspects run alone; an entry out of attempts is
dead-lettered.

The rules, each kept by one place below:
- a read reserves its room (entries and bytes) before it is sent, and holds what it brought before
  its next await, so together the readers never overrun the window;
- one reclaim at a time; while each fills all the room it had, the next goes first again: a dead
  worker's entries (older than anything new) come back at the pace room frees;
- a suspect (an entry a worker died running with others) runs alone: no reader takes more until
  it has settled, so a death then is charged to it only;
- an entry can come twice after a Redis stall (a late read and a reclaim): the copy held first runs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from worker.core.errors import BrokerError
from worker.core.logs import Outage
from worker.core.metrics import Metrics
from worker.core.protocol import PRIORITIES, Delivery, JobResult, valid_job_id
from worker.core.settings import Settings
from worker.pipeline.admission import Admission
from worker.pipeline.inflight import Inflight
from worker.pipeline.lifecycle import Lifecycle
from worker.pipeline.settler import Marks, Settler
from worker.transport.broker import Broker
from worker.transport.connection import WORKER_BACKOFF

logger = logging.getLogger(__name__)


class Intake:
    def __init__(
        self,
        *,
        settings: Settings,
        broker: Broker,
        inflight: Inflight,
        settler: Settler,
        marks: Marks,
        admission: Admission,
        metrics: Metrics,
        lifecycle: Lifecycle,
    ) -> None:
        self._redis = settings.redis
        self._largest = settings.pipeline.max_image_bytes
        self._broker = broker
        self._inflight = inflight
        self._settler = settler
        self._marks = marks
        self._admission = admission
        self._metrics = metrics
        self._lifecycle = lifecycle
        #: held while suspects run alone: no reader may take more until they are settled
        self._isolating = asyncio.Lock()
        #: keys of suspects claimed by a reader and waiting for their turn to run alone
        self._queued_suspects: set[str] = set()
        self._next_reclaim = 0.0
        self._reclaiming = False
        self._reclaim_every_s = min(self._redis.lease_s / 2, max(self._redis.retry_backoff_s, 0.5))
        #: the most one reader asks for: its share of the window, so that every reader can read at once
        self._read_share = -(-inflight.capacity // self._redis.concurrent_reads)
        self._byte_share = inflight.byte_capacity // self._redis.concurrent_reads
        #: the last read brought an entry larger than a reader's share of the bytes: reads go one at
        #: a time (each may cross its budget by one entry). Until a read says otherwise, assumed
        self._large_entries = True

    async def run(self, burst: bool) -> None:
        """Until a stop (or, with ``burst``, until nothing is queued or held). A server sends a large
        reply 64 KB per turn of its event loop, so one read at a time would cap a worker's intake."""
        await asyncio.gather(*(self._reader(burst, first=i == 0) for i in range(self._redis.concurrent_reads)))

    async def _reader(self, burst: bool, first: bool) -> None:
        outage = Outage(logger, "intake") if first else None  # the readers fail together: logged once
        delays = WORKER_BACKOFF.delays()
        while not self._lifecycle.stopping:
            waited = time.perf_counter()
            await self._inflight.wait(self._may_read)
            if first:  # every reader waits alike while the window is full: counted once
                self._metrics.window_full.inc(time.perf_counter() - waited)
            if self._lifecycle.stopping:
                return
            try:
                if not await self._read_and_admit(burst):
                    return
                delays = WORKER_BACKOFF.delays()
                if outage:
                    outage.recovered()
            except BrokerError as exc:
                if outage:
                    outage.failed(exc)
                await self._lifecycle.pause(next(delays))

    def _may_read(self) -> bool:
        """Room in the window, no suspect running alone, and with large entries no other read on the
        wire (or a stop, which ends the reader)."""
        one_at_a_time = self._large_entries and self._inflight.reserved_bytes > 0
        room = self._inflight.free > 0 and not self._isolating.locked() and not one_at_a_time
        return room or self._lifecycle.stopping

    async def _read_and_admit(self, burst: bool) -> bool:
        """Entries reclaimed (every so often, as many as there is room for) or else new ones (up to
        this reader's share), admitted; False once a burst has run dry."""
        deliveries: list[Delivery] = []
        if time.monotonic() >= self._next_reclaim and not self._reclaiming:
            self._reclaiming, room = True, self._inflight.free
            try:
                with self._inflight.reserving(room):
                    deliveries = await self._reclaim_entries(room)
            finally:
                self._reclaiming = False
            if len(deliveries) < room:
                self._next_reclaim = time.monotonic() + self._reclaim_every_s
        if not deliveries and (room := min(self._inflight.free, self._read_share)):
            deliveries = await self._read_entries(room)
        await self._admit_all(deliveries)  # holds what came before its first await
        if not deliveries and burst and not len(self._inflight) and await self._broker.backlog() == 0:
            logger.info("burst: queue empty and nothing in flight")
            return False
        return True

    async def _reclaim_entries(self, room: int) -> list[Delivery]:
        """What dead workers left, and this worker's own entries due for a retry."""
        reclaimed = await self._broker.reclaim(self._inflight.keys() | self._queued_suspects, room)
        self._metrics.redeliveries.inc(len(reclaimed))
        return reclaimed

    async def _read_entries(self, room: int) -> list[Delivery]:
        """Queued entries within this reader's share of the bytes (all the free bytes, one reader at
        a time, while entries are large); when none are queued, wait on the server for the next."""
        started = time.perf_counter()
        free_bytes = self._inflight.free_bytes
        nbytes = free_bytes if self._large_entries else min(free_bytes, self._byte_share)
        with self._inflight.reserving(room, nbytes):
            deliveries = await self._broker.read(room, nbytes, self._largest)
        if deliveries:
            self._large_entries = max(d.nbytes for d in deliveries) > self._byte_share
        else:
            with self._inflight.reserving(min(room, len(PRIORITIES))):
                deliveries = await self._broker.wait_for_entries()
        self._metrics.read.observe(time.perf_counter() - started)
        return deliveries

    async def _admit_all(self, deliveries: list[Delivery]) -> None:
        """Most entries start at once; a suspect runs alone; a job out of attempts is dead-lettered.

        A worker that dies running several jobs cannot tell which one killed it, so it charges
        none of them: each becomes a suspect and runs alone, with nothing else in the pipeline. A
        death then is charged to that job only, so a job that kills workers (a decoder crash,
        say) is dead-lettered after ``max_deliveries`` deaths of its own, and an innocent job
        caught in crashes (OOM kills, node loss) is never charged for its neighbours.
        """
        ordinary: list[Delivery] = []
        suspects: list[Delivery] = []
        for delivery in self._not_held(deliveries):
            if delivery.attempts >= self._redis.max_deliveries:
                self._inflight.hold(delivery)
                self._lifecycle.spawn(self._dead_letter(delivery))
            else:
                (suspects if delivery.suspect else ordinary).append(delivery)
        for delivery in ordinary:
            self._inflight.hold(delivery)
        self._queued_suspects.update(d.key for d in suspects)  # claimed, not held: no reader may reclaim them
        if reclaimed := [d for d in ordinary if d.deliveries > 1]:  # not marked by a read
            await self._marks.running(reclaimed)
        self._admission.admit(ordinary)
        if suspects:
            # one reader's suspects at a time: two sets each waiting to be alone would wait forever
            try:
                async with self._isolating:  # the other readers pause until the suspects have run
                    await self._run_alone(suspects)
            finally:
                self._queued_suspects.difference_update(d.key for d in suspects)  # those not started
                self._inflight.wake()  # the lock is free again: waiting readers look

    def _not_held(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Those not held or queued already. After a Redis stall one entry can come twice: a read
        that Redis ran late hands it over while a reclaim, whose look at what is held predates
        that read, claims it as left behind. The copy held first runs; the other is dropped."""
        fresh = [d for d in deliveries if d.key not in self._inflight and d.key not in self._queued_suspects]
        if len(fresh) < len(deliveries):
            logger.info(
                "%d entries came twice (a read and a reclaim after a stall): run once", len(deliveries) - len(fresh)
            )
        return fresh

    async def _run_alone(self, suspects: list[Delivery]) -> None:
        """Each suspect once nothing else is held or being read, and nothing else until it is settled."""

        def alone() -> bool:
            return (len(self._inflight) == 1 and not self._inflight.reserved) or self._lifecycle.stopping

        for suspect in suspects:
            if self._lifecycle.stopping:  # not started: claimable by others, nothing counted
                return
            self._queued_suspects.discard(suspect.key)
            if not self._not_held([suspect]):
                continue
            self._inflight.hold(suspect)
            await self._inflight.wait(alone)
            if self._lifecycle.stopping:
                await self._settler.leave([suspect])
                return
            await self._marks.running([suspect])
            self._metrics.isolated_runs.inc()
            self._admission.admit([suspect])
            await self._inflight.wait(lambda: len(self._inflight) == 0 or self._lifecycle.stopping)

    async def _dead_letter(self, delivery: Delivery) -> None:
        job_id = valid_job_id(delivery.fields.get(b"id")) or delivery.entry_id
        reason = f"gave up after {delivery.attempts} failed attempts"
        try:
            if last := await self._broker.last_error(delivery):
                reason += f"; last error: {last}"
        except BrokerError as exc:
            logger.debug("no last error for %s: %s", delivery.key, exc)
        logger.error("dead-lettering job %s: %s", job_id, reason)
        await self._settler.settle(
            [JobResult.failure(job_id, "max_deliveries", reason).settlement(delivery)], dead=True
        )
