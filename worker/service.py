"""The pipeline, wired: read → decode (thread pool) → route → per-bucket batcher → lane runners →
postprocess (thread pool) → settle. asyncio on top; blocking work on threads.

``Service`` is the composition root: intake and admission live here; a bucket's execution lives
in ``executor``, settling in ``settler``, the read-ahead window in ``inflight``. Every task runs in
one TaskGroup: a task that dies takes the worker down with exit status 1, so it is restarted
rather than left wedged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from worker.backends.base import Backend, Lane
from worker.batcher import Batcher
from worker.broker import Broker
from worker.buckets import ModelSpec
from worker.connection import PROBE_TIMEOUT_S
from worker.errors import BrokerError, ConfigError, ImageTooLargeError, JobError, JobExpiredError, StalledError
from worker.executor import BucketExecutor, Inferred, Job, Retry
from worker.imaging import ByteBudget, Limits, Prepared, prepare
from worker.inflight import Inflight
from worker.logs import Outage
from worker.metrics import Metrics
from worker.protocol import PRIORITIES, Delivery, JobRequest, JobResult, Settlement, now_ms, valid_job_id
from worker.settings import Settings
from worker.settler import BROKER_RETRY_S, Settler

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0
PROBE_INTERVAL_S = 1.0
WATCHDOG_INTERVAL_S = 1.0
#: kept back from the grace period for leaving entries and dropping the lease
EXIT_MARGIN_S = 1.0
T = TypeVar("T")


class _Finished(Exception):  # noqa: N818 - a signal, not an error
    """Ends the service's TaskGroup once draining is over (the idiom for cancelling its other tasks)."""


class Service:
    """Owns the pipeline's tasks and pools; signal handling and the HTTP server belong to the CLI."""

    def __init__(self, settings: Settings, spec: ModelSpec, backend: Backend, broker: Broker, metrics: Metrics) -> None:
        self.settings = settings
        self.spec = spec
        self.backend = backend
        self.broker = broker
        self.metrics = metrics
        self.warm = False
        self.redis_ok = False
        self.wedged = False
        self.exit_code = 0
        self._stopping = asyncio.Event()
        self._stop_deadline = float("inf")
        pipeline = settings.pipeline
        self._cpu_pool = ThreadPoolExecutor(pipeline.decode_threads, thread_name_prefix="cpu")
        self._budget = ByteBudget(pipeline.decode_budget_mib << 20)
        self._limits = Limits(pipeline.max_pixels, self._budget.capacity)
        self.executors = {
            b.id: BucketExecutor(b, spec, backend, metrics, self._cpu_pool, worker=settings.redis.consumer)
            for b in spec.buckets
        }
        self.batchers: dict[str, Batcher[Job]] = {
            b.id: Batcher(b, lambda job: job.padded_shape, priority_of=lambda job: job.request.priority)
            for b in spec.buckets
        }
        window = pipeline.max_inflight or sum(2 * len(ex.lanes) * ex.bucket.max_batch for ex in self.executors.values())
        self.inflight = Inflight(window, pipeline.max_image_bytes)
        self.settler = Settler(broker, self.inflight, metrics)
        self._received = {p: metrics.jobs_received.labels(p) for p in PRIORITIES}
        self._queue_wait = {p: metrics.queue_wait.labels(p) for p in PRIORITIES}
        metrics.inflight.set_function(lambda: len(self.inflight))
        metrics.decode_budget_used.set_function(lambda: self._budget.used)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._group: asyncio.TaskGroup
        #: entries the watchdog found held past stall_s: left marked running, as if this worker died
        self._stuck: list[Delivery] = []
        #: decoded entries queued for a lane, to be marked waiting with the next batch's marking
        self._waiting: list[Delivery] = []
        self._marking = asyncio.Lock()
        #: held while suspects run alone: no reader may take more until they are settled
        self._isolating = asyncio.Lock()
        #: keys of suspects claimed by a reader and waiting for their turn to run alone
        self._queued_suspects: set[str] = set()
        redis = settings.redis
        self._next_reclaim = 0.0
        self._reclaiming = False
        self._reclaim_every_s = min(redis.lease_s / 2, max(redis.retry_backoff_s, 0.5))
        #: the most one reader asks for: its share of the window, so that every reader can read at once
        self._read_share = min(redis.read_count, -(-window // redis.concurrent_reads))
        self._byte_share = self.inflight.byte_capacity // redis.concurrent_reads
        #: the last read brought an entry larger than a reader's share of the bytes: reads go one at
        #: a time (each may cross its budget by one entry). Until a read says otherwise, assumed
        self._large_entries = True
        metrics.inflight_capacity.set(window)

    # ---- state ----------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.warm and self.redis_ok and self.backend.healthy and not self.wedged and not self._stopping.is_set()

    def lanes_idle(self) -> bool:
        """No batch runs inside the backend: only then may it be closed."""
        return all(ex.running == 0 for ex in self.executors.values())

    def _set_redis(self, ok: bool) -> None:
        """Readiness follows the probe alone; each change is logged once."""
        if ok != self.redis_ok:
            if ok:
                logger.info("redis answers: ready")
            else:
                logger.warning("redis does not answer within %.1f s: not ready", PROBE_TIMEOUT_S)
        self.redis_ok = ok
        self.metrics.ready.set(1 if self.ready() else 0)

    def stop(self) -> None:
        """Stop reading; what is in flight is finished and settled within the grace period."""
        if not self._stopping.is_set():
            logger.info("stopping: no new jobs, settling %d in flight", len(self.inflight))
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_s - EXIT_MARGIN_S
            self._stopping.set()
            self.metrics.ready.set(0)
            self.inflight.wake()

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
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

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early on a stop."""
        await self._unless_stopped(asyncio.sleep(seconds))

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, burst: bool = False) -> int:
        """Serve until stopped (or, with ``burst``, until nothing is queued or in flight)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._serve(burst))
        except BaseExceptionGroup as group_error:
            _, failures = group_error.split(_Finished)
            if failures is not None:
                first = failures.exceptions[0]
                if isinstance(first, ConfigError):
                    raise first from None
                logger.error("a pipeline task failed; exiting so the worker is restarted", exc_info=first)
                self.exit_code = 1
        finally:
            await self._leave_the_rest()
            for executor in self.executors.values():
                executor.shutdown()
            self._cpu_pool.shutdown(wait=False, cancel_futures=True)
            self.metrics.ready.set(0)
        return self.exit_code

    async def _serve(self, burst: bool) -> None:
        if await self._until_redis(self.broker.ensure_groups) and await self._until_redis(self.broker.heartbeat):
            for loop in (self._probe_loop, self._heartbeat_loop, self._stats_loop, self._watchdog_loop):
                self._group.create_task(loop())
            finished, _ = await self._unless_stopped(self._warm_up())
            if finished:
                self.warm = True
                self.metrics.ready.set(1 if self.ready() else 0)
                runners = [
                    self._group.create_task(self._lane_runner(executor, lane))
                    for executor in self.executors.values()
                    for lane in executor.lanes
                ]
                await self._intake(burst)
                await self._drain(runners)
        # The background loops end on this as well as on the group's cancellation: redis-py's asyncio
        # client can lose a cancellation that lands inside a call, and a loop that lost it would
        # keep the group, and with it the process, alive after a burst.
        self._stopping.set()
        raise _Finished

    async def _warm_up(self) -> None:
        """One batch per lane at its opt shape: ready only after every profile has run."""

        async def bucket(executor: BucketExecutor) -> None:
            started = time.perf_counter()
            for lane in executor.lanes:
                await executor.warm_up(lane)
            logger.info(
                "bucket %s warmed up (%d lanes) in %.0f ms",
                executor.bucket.id,
                len(executor.lanes),
                (time.perf_counter() - started) * 1000,
            )

        await asyncio.gather(*(bucket(ex) for ex in self.executors.values()))

    async def _until_redis(self, call: Any) -> bool:
        """Retry a start-up call until Redis answers (True) or a stop comes (False)."""
        outage = Outage(logger, "connecting to redis")
        while not self._stopping.is_set():
            try:
                await call()
                outage.recovered()
                self._set_redis(True)
                return True
            except BrokerError as exc:
                outage.failed(exc)
                await self._pause(BROKER_RETRY_S)
        return False

    async def _drain(self, runners: list[asyncio.Task[None]]) -> None:
        """After a burst, finish and settle everything held. After a stop, hand back what no lane
        has started (other workers take it at once, nothing charged) and finish the batches
        running; either until the grace period runs out."""
        left = self._stop_deadline - time.monotonic() if self._stopping.is_set() else None

        async def everything() -> None:
            if self._stopping.is_set():  # what no lane has started goes back to the streams at once
                for batcher in self.batchers.values():
                    batcher.close()
                    if queued := batcher.take_all():
                        self._spawn("hand back", self.settler.leave([job.delivery for job in queued]))
            while self._admissions():
                await asyncio.gather(*self._admissions(), return_exceptions=True)
            for batcher in self.batchers.values():
                batcher.close()
            await asyncio.gather(*runners)
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

        try:
            async with asyncio.timeout(left):
                await everything()
        except TimeoutError:
            logger.warning("grace period over with %d jobs unsettled; they are left for others", len(self.inflight))

    def _admissions(self) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if t.get_name().startswith("admit")]

    async def _leave_the_rest(self) -> None:
        """Entries still held go back uncharged, except what wedged the pipeline.

        A wedge counts as a death: stuck entries stay marked running, so whoever reclaims them
        makes them suspects that run alone; a suspect that wedged it alone is charged here.
        """
        for task in list(self._tasks):
            task.cancel()
        stuck_keys = {d.key for d in self._stuck}
        held = [d for d in self.inflight.deliveries() if d.key not in stuck_keys]
        if culprits := [d for d in self._stuck if d.suspect]:
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

    def _spawn(self, name: str, coro: Any) -> None:
        """A task of the service's group: should it raise (a bug), the worker exits 1 and is restarted."""
        task = self._group.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- background loops ------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Readiness: Redis answers a PING on its own connection within PROBE_TIMEOUT_S."""
        while not self._stopping.is_set():
            self._set_redis(await self.broker.answers())
            await self._pause(PROBE_INTERVAL_S)

    async def _heartbeat_loop(self) -> None:
        outage = Outage(logger, "heartbeat")
        while not self._stopping.is_set():
            await self._pause(self.settings.redis.lease_s / 3)
            try:
                await self.broker.heartbeat()
                outage.recovered()
            except BrokerError as exc:
                outage.failed(exc)

    async def _stats_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                for priority, stats in (await self.broker.stats()).items():
                    self.metrics.stream_length.labels(priority).set(stats.length)
                    self.metrics.stream_lag.labels(priority).set(stats.lag)
                    self.metrics.stream_pending.labels(priority).set(stats.pending)
            except BrokerError as exc:
                logger.debug("stats failed: %s", exc)
            await self._pause(STATS_INTERVAL_S)

    async def _watchdog_loop(self) -> None:
        """A job held past ``stall_s`` means the pipeline is wedged: not ready, exit 1, left for others."""
        stall_s = self.settings.pipeline.stall_s
        while not self._stopping.is_set():
            self.metrics.ready.set(1 if self.ready() else 0)
            if stuck := self.inflight.held_longer_than(stall_s):
                logger.error(
                    "pipeline wedged: %d jobs held over stall_s %.0f s; exiting, they will run alone elsewhere",
                    len(stuck),
                    stall_s,
                )
                self.wedged = True
                self._stuck = stuck
                self.exit_code = 1
                self.stop()
                self._stop_deadline = time.monotonic()  # nothing to drain into a wedged pipeline
                return
            await self._pause(WATCHDOG_INTERVAL_S)

    # ---- intake ----------------------------------------------------------------------------

    async def _intake(self, burst: bool) -> None:
        """``concurrent_reads`` readers share the in-flight window.

        A server sends a large reply 64 KB per turn of its event loop, so on a busy server a read
        of several megabytes of images takes tens of milliseconds whatever its size: one read at a
        time caps a worker's intake. Each reader reserves its room before it reads (up to its
        share of the window, so that every reader can be on the wire at once), and together
        they never hold more than the window.
        """
        readers = self.settings.redis.concurrent_reads
        await asyncio.gather(*(self._reader(burst, first=i == 0) for i in range(readers)))

    async def _reader(self, burst: bool, first: bool) -> None:
        outage = Outage(logger, "intake") if first else None  # the readers fail together: logged once
        while not self._stopping.is_set():
            waited = time.perf_counter()
            await self.inflight.wait(self._may_read)
            if first:  # every reader waits alike while the window is full: counted once
                self.metrics.window_full.inc(time.perf_counter() - waited)
            if self._stopping.is_set():
                return
            try:
                if not await self._read_and_admit(burst):
                    return
                if outage:
                    outage.recovered()
            except BrokerError as exc:
                if outage:
                    outage.failed(exc)
                await self._pause(BROKER_RETRY_S)

    def _may_read(self) -> bool:
        """Room in the window, no suspect running alone, and with large entries no other read on the
        wire (or a stop, which ends the reader)."""
        one_at_a_time = self._large_entries and self.inflight.reserved_bytes > 0
        return (
            self.inflight.free > 0 and not self._isolating.locked() and not one_at_a_time
        ) or self._stopping.is_set()

    async def _read_and_admit(self, burst: bool) -> bool:
        """Entries reclaimed (every so often, as many as there is room for) or else new ones (up to
        this reader's share), admitted; False once a burst has run dry."""
        deliveries: list[Delivery] = []
        if time.monotonic() >= self._next_reclaim and not self._reclaiming:
            # one reclaim at a time; while each fills all the room it had, the next goes first again:
            # a dead worker's entries (older than anything new) are taken back at the pace room frees
            self._reclaiming, room = True, self.inflight.free
            try:
                with self.inflight.reserving(room):
                    deliveries = await self._reclaim_entries(room)
            finally:
                self._reclaiming = False
            if len(deliveries) < room:
                self._next_reclaim = time.monotonic() + self._reclaim_every_s
        if not deliveries and (room := min(self.inflight.free, self._read_share)):
            deliveries = await self._read_entries(room)
        await self._admit_all(deliveries)  # holds what came before its first await
        if not deliveries and burst and not len(self.inflight) and await self.broker.backlog() == 0:
            logger.info("burst: queue empty and nothing in flight")
            return False
        return True

    async def _reclaim_entries(self, room: int) -> list[Delivery]:
        """What dead workers left, and this worker's own entries due for a retry."""
        reclaimed = await self.broker.reclaim(self.inflight.keys() | self._queued_suspects, room)
        self.metrics.redeliveries.inc(len(reclaimed))
        return reclaimed

    async def _read_entries(self, room: int) -> list[Delivery]:
        """Queued entries within this reader's share of the bytes (all the free bytes, one reader at
        a time, while entries are large); when none are queued, wait on the server for the next."""
        started = time.perf_counter()
        free_bytes = self.inflight.free_bytes
        nbytes = free_bytes if self._large_entries else min(free_bytes, self._byte_share)
        with self.inflight.reserving(room, nbytes):
            deliveries = await self.broker.read(room, nbytes, self.settings.pipeline.max_image_bytes)
        if deliveries:
            self._large_entries = max(d.nbytes for d in deliveries) > self._byte_share
        else:
            with self.inflight.reserving(min(room, len(PRIORITIES))):
                deliveries = await self.broker.wait_for_entries()
        self.metrics.read.observe(time.perf_counter() - started)
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
            if delivery.attempts >= self.settings.redis.max_deliveries:
                self.inflight.hold(delivery)
                self._spawn(f"dead {delivery.key}", self._dead_letter(delivery))
            else:
                (suspects if delivery.suspect else ordinary).append(delivery)
        for delivery in ordinary:
            self.inflight.hold(delivery)
        self._queued_suspects.update(d.key for d in suspects)  # claimed, not held: no reader may reclaim them
        await self._mark_or_run_unmarked([d for d in ordinary if d.deliveries > 1])  # reclaimed: not marked yet
        self._admit_chunks(ordinary)
        if suspects:
            # one reader's suspects at a time: two sets each waiting to be alone would wait forever
            try:
                async with self._isolating:  # the other readers pause until the suspects have run
                    await self._run_alone(suspects)
            finally:
                self._queued_suspects.difference_update(d.key for d in suspects)  # those not started
                self.inflight.wake()  # the lock is free again: waiting readers look

    def _not_held(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Those not held or queued already. After a Redis stall one entry can come twice: a read
        that Redis ran late hands it over while a reclaim, whose look at what is held predates
        that read, claims it as left behind. The copy held first runs; the other is dropped."""
        fresh = [d for d in deliveries if d.key not in self.inflight and d.key not in self._queued_suspects]
        if len(fresh) < len(deliveries):
            logger.info(
                "%d entries came twice (a read and a reclaim after a stall): run once", len(deliveries) - len(fresh)
            )
        return fresh

    async def _run_alone(self, suspects: list[Delivery]) -> None:
        """Each suspect once nothing else is held or being read, and nothing else until it is settled."""

        def alone() -> bool:
            return (len(self.inflight) == 1 and not self.inflight.reserved) or self._stopping.is_set()

        for suspect in suspects:
            if self._stopping.is_set():  # not started: claimable by others, nothing counted
                return
            self._queued_suspects.discard(suspect.key)
            if not self._not_held([suspect]):
                continue
            self.inflight.hold(suspect)
            await self.inflight.wait(alone)
            if self._stopping.is_set():
                await self.settler.leave([suspect])
                return
            await self._mark_or_run_unmarked([suspect])
            self.metrics.isolated_runs.inc()
            self._admit_chunks([suspect])
            await self.inflight.wait(lambda: len(self.inflight) == 0 or self._stopping.is_set())

    async def _mark_or_run_unmarked(self, deliveries: list[Delivery]) -> None:
        """Held entries marked running; if Redis does not answer they run unmarked (a death then
        charges nothing), as a batch does: left held and never run, they would fill the window."""
        try:
            await self.broker.mark(running=deliveries)
        except BrokerError as exc:
            logger.debug("could not mark %d entries running: %s", len(deliveries), exc)

    async def _dead_letter(self, delivery: Delivery) -> None:
        job_id = valid_job_id(delivery.fields.get(b"id")) or delivery.entry_id
        reason = f"gave up after {delivery.attempts} failed attempts"
        try:
            if last := await self.broker.last_error(delivery):
                reason += f"; last error: {last}"
        except BrokerError as exc:
            logger.debug("no last error for %s: %s", delivery.key, exc)
        logger.error("dead-lettering job %s: %s", job_id, reason)
        await self.settler.settle([JobResult.failure(job_id, "max_deliveries", reason).settlement(delivery)], dead=True)

    def _admit_chunks(self, deliveries: list[Delivery]) -> None:
        """Parse and check on the loop; decode in chunks on the CPU pool: a future per chunk, not per job."""
        accepted: list[tuple[Delivery, JobRequest, float]] = []
        failures: list[Settlement] = []
        for delivery in deliveries:
            request: JobRequest | None = None
            try:
                request = JobRequest.decode(delivery.fields)
                self._received[request.priority].inc()
                queue_ms = float(max(now_ms() - request.enqueued_ms, 0)) if request.enqueued_ms else 0.0
                if request.enqueued_ms:
                    self._queue_wait[request.priority].observe(queue_ms / 1000)
                if request.deadline_ms and now_ms() > request.deadline_ms:
                    raise JobExpiredError(f"deadline passed {now_ms() - request.deadline_ms} ms before decoding")
                limit = self.settings.pipeline.max_image_bytes
                if len(request.image) > limit:
                    raise ImageTooLargeError(f"image is {len(request.image)} bytes, the limit is {limit}")
                accepted.append((delivery, request, queue_ms))
            except JobError as exc:
                failures.append(self._failure(delivery, request, exc.code, str(exc)))
        if failures:
            self._spawn("settle failures", self.settler.settle(failures))
        size = max(1, min(8, -(-len(accepted) // self.settings.pipeline.decode_threads)))
        for start in range(0, len(accepted), size):
            chunk = accepted[start : start + size]
            self._spawn(f"admit {chunk[0][0].key}", self._decode(chunk))

    async def _decode(self, chunk: list[tuple[Delivery, JobRequest, float]]) -> None:
        """Decode one chunk on a CPU thread; each image then goes to its bucket's batcher or fails alone."""
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self._cpu_pool, self._prepare_many, [request.image for _, request, _ in chunk], time.perf_counter()
        )
        failures, left = [], []
        for (delivery, request, queue_ms), (wait_s, prepared) in zip(chunk, outcomes, strict=True):
            if isinstance(prepared, JobError):
                failures.append(self._failure(delivery, request, prepared.code, str(prepared)))
                continue
            if isinstance(prepared, BaseException):
                logger.error("unexpected error preparing entry %s", delivery.key, exc_info=prepared)
                failures.append(
                    self._failure(delivery, request, "internal_error", "internal error preparing the image")
                )
                continue
            self.metrics.decode_wait.observe(wait_s)
            self.metrics.decode.observe(prepared.decode_s)
            self.metrics.decode_paths.labels("gpu" if prepared.compressed else "cpu", prepared.format).inc()
            timings = {
                "queue": queue_ms,
                "decode_wait": round(wait_s * 1000, 2),
                "decode": round(prepared.decode_s * 1000, 2),
            }
            batcher = self.batchers[prepared.bucket.id]
            if batcher.closed:  # drained while decoding: left for the next worker
                left.append(delivery)
            else:
                batcher.put(Job(delivery, request, prepared, timings))
                self._waiting.append(delivery)
        await self.settler.settle(failures)
        if left:
            await self.settler.leave(left)

    def _prepare_many(self, images: list[bytes], submitted: float) -> list[tuple[float, Prepared | Exception]]:
        out: list[tuple[float, Prepared | Exception]] = []
        for image in images:
            wait_s = time.perf_counter() - submitted
            try:
                prepared = prepare(image, self.spec, self._limits, self._budget, self.backend.decodes_jpeg)
                out.append((wait_s, prepared))
            except Exception as exc:  # one bad image fails alone; the caller turns it into its result
                out.append((wait_s, exc))
        return out

    def _failure(self, delivery: Delivery, request: JobRequest | None, code: str, message: str) -> Settlement:
        # An id that is missing, not UTF-8 or too long is never altered: the entry id stands in for it.
        job_id = request.job_id if request else valid_job_id(delivery.fields.get(b"id")) or delivery.entry_id
        enqueued_ms = request.enqueued_ms if request else 0
        return JobResult.failure(job_id, code, message).settlement(delivery, enqueued_ms=enqueued_ms)

    # ---- execution -------------------------------------------------------------------------

    async def _lane_runner(self, executor: BucketExecutor, lane: Lane) -> None:
        """Feeds one lane: it takes a batch only when the lane is free, so batches fill while it runs."""
        batcher = self.batchers[executor.bucket.id]
        while batch := await batcher.next_batch():
            taken = time.monotonic()
            jobs = []
            for queued_at, job in batch:
                waited = taken - queued_at
                executor.batch_wait.observe(waited)
                job.timings_ms["batch_wait"] = round(waited * 1000, 2)
                jobs.append(job)
            await self._mark_running(jobs)
            outcomes = await executor.infer(lane, jobs)
            self._spawn(f"finish {executor.bucket.id}", self._finish(executor, outcomes))

    async def _mark_running(self, jobs: list[Job]) -> None:
        """Before a batch takes its lane: it counts as running again, and what decoded since only waits.

        One round trip per batch. If Redis does not answer, the batch runs unmarked (a death would
        then charge nothing for it) rather than wait: settling will wait for Redis anyway.
        """
        started = time.perf_counter()
        async with self._marking:  # in order: a later batch's marks must not land before an earlier one's
            waiting, self._waiting = self._waiting, []
            try:
                await self.broker.mark(running=[job.delivery for job in jobs], waiting=waiting)
                self.metrics.mark.observe(time.perf_counter() - started)
            except BrokerError as exc:
                logger.debug("could not mark a batch running: %s", exc)
                self._waiting = waiting + self._waiting

    async def _finish(self, executor: BucketExecutor, outcomes: list[Inferred | Settlement | Retry]) -> None:
        """Postprocess off the lane, then settle: the lane is already running its next batch."""
        settlements = [o for o in outcomes if isinstance(o, Settlement)]
        retries = [o for o in outcomes if isinstance(o, Retry)]
        inferred = [o for o in outcomes if isinstance(o, Inferred)]
        if inferred:
            settlements += await executor.postprocess(inferred)
        await self.settler.settle(settlements)
        await self.settler.retry_later([(r.job.delivery, r.error) for r in retries])
        if not self.backend.healthy and self.exit_code == 0:
            logger.error("the backend is unusable; stopping so the worker is restarted")
            self.exit_code = 1
            self.stop()
