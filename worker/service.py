"""The pipeline: read → decode (thread pool) → route → per-bucket batcher → per-bucket executor →
postprocess → settle. asyncio on top, blocking work on threads: one pool for CPU work, one thread
per bucket instance so a backend context is never shared between threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.backends.base import Backend, Outputs
from worker.batcher import Batcher
from worker.broker import Broker, Delivery
from worker.buckets import BucketSpec, ModelSpec
from worker.errors import BackendError, BrokerError, ImageTooLargeError, JobError, JobExpiredError, TransientError
from worker.imaging import Prepared, pad_batch, prepare
from worker.metrics import Metrics
from worker.postprocess import text_boxes
from worker.protocol import JobRequest, JobResult, job_id_of
from worker.settings import Settings

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0
BROKER_RETRY_S = 0.5


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    delivery: Delivery
    request: JobRequest
    prepared: Prepared
    timings_ms: dict[str, float] = field(default_factory=dict)

    def padded_shape(self) -> tuple[int, int]:
        return self.prepared.padded_height, self.prepared.padded_width


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
        self.exit_code = 0
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._inflight: dict[str, Delivery] = {}
        #: why an entry this worker left pending failed last, for its dead-letter reason
        self._last_errors: dict[str, str] = {}
        self._admissions: set[asyncio.Task[None]] = set()
        self._batchers: dict[str, Batcher[Job]] = {b.id: Batcher(b, Job.padded_shape) for b in spec.buckets}
        self._cpu_pool = ThreadPoolExecutor(settings.pipeline.decode_threads, thread_name_prefix="cpu")
        self._bucket_pools = {
            b.id: ThreadPoolExecutor(backend.instances(b.id), thread_name_prefix=f"bucket-{b.id}") for b in spec.buckets
        }
        metrics.backend_info.info(backend.describe())

    # ---- lifecycle -------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.warm and self.redis_ok and self.backend.healthy and not self._stopping.is_set()

    def stop(self) -> None:
        """Stop reading; what is in flight is finished and settled (SIGTERM/SIGINT)."""
        if not self._stopping.is_set():
            logger.info("stopping: no new jobs, settling %d in flight", len(self._inflight))
        self._stopping.set()

    async def _in_pool(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def warm_up(self) -> None:
        """One batch per bucket at its opt shape: ready only after every profile has run."""
        for bucket in self.spec.buckets:
            shape = self.spec.input_shapes(bucket)[1]
            started = time.perf_counter()
            await self._in_pool(
                self._bucket_pools[bucket.id], self.backend.infer, bucket.id, np.zeros(shape, np.float32)
            )
            logger.info(
                "bucket %s warmed up at %s in %.0f ms", bucket.id, shape, (time.perf_counter() - started) * 1000
            )
        self.warm = True

    async def run(self, burst: bool = False) -> int:
        """Serve until stopped (or, with ``burst``, until nothing is queued or in flight)."""
        await self._until_redis(self.broker.ensure_groups)
        await self._until_redis(self.broker.heartbeat)
        await self.warm_up()
        self._refresh_ready()
        background = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._stats_loop())]
        runners = [
            asyncio.create_task(self._run_bucket(bucket))
            for bucket in self.spec.buckets
            for _ in range(self.backend.instances(bucket.id))
        ]
        try:
            await self._intake(burst)
            try:
                async with asyncio.timeout(self.settings.shutdown_grace_s):
                    await self._drain(runners)
            except TimeoutError:
                logger.warning("grace period over with %d jobs unsettled; they will be reclaimed", len(self._inflight))
        finally:
            self._stopping.set()
            for task in [*background, *runners, *self._admissions]:
                task.cancel()
            await asyncio.gather(*background, *runners, *self._admissions, return_exceptions=True)
            try:
                await self.broker.release()
            except BrokerError as exc:
                logger.warning("could not release the lease: %s", exc)
            self._cpu_pool.shutdown(wait=False, cancel_futures=True)
            for pool in self._bucket_pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            self._refresh_ready()
        return self.exit_code

    async def _drain(self, runners: list[asyncio.Task[None]]) -> None:
        while self._admissions:
            await asyncio.gather(*list(self._admissions), return_exceptions=True)
        for batcher in self._batchers.values():
            batcher.close()
        await asyncio.gather(*runners)

    async def _until_redis(self, call: Any) -> None:
        while True:
            try:
                await call()
                self.redis_ok = True
                return
            except BrokerError as exc:
                self.redis_ok = False
                self._refresh_ready()
                if self._stopping.is_set():
                    raise
                logger.warning("waiting for redis: %s", exc)
                await asyncio.sleep(BROKER_RETRY_S)

    def _refresh_ready(self) -> None:
        self.metrics.ready.set(1 if self.ready() else 0)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.redis.lease_s / 3)
            try:
                await self.broker.heartbeat()
                self.redis_ok = True
            except BrokerError as exc:
                self.redis_ok = False
                logger.warning("heartbeat failed: %s", exc)
            self._refresh_ready()

    async def _stats_loop(self) -> None:
        while True:
            try:
                for priority, stats in (await self.broker.stats()).items():
                    self.metrics.stream_lag.labels(priority).set(stats.lag)
                    self.metrics.stream_pending.labels(priority).set(stats.pending)
            except BrokerError as exc:
                logger.debug("stats failed: %s", exc)
            await asyncio.sleep(STATS_INTERVAL_S)

    # ---- intake ----------------------------------------------------------------------------

    async def _intake(self, burst: bool) -> None:
        reclaim_every_s = min(self.settings.redis.lease_s / 2, max(self.settings.redis.retry_backoff_s, 0.5))
        next_reclaim = 0.0
        while not self._stopping.is_set():
            free = self.settings.pipeline.max_inflight - len(self._inflight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + reclaim_every_s
                    deliveries = await self.broker.reclaim(set(self._inflight))
                    self.metrics.redeliveries.inc(len(deliveries))
                if not deliveries:
                    deliveries = await self.broker.read(min(free, self.settings.redis.read_count))
                if not deliveries and burst and not self._inflight and await self.broker.backlog() == 0:
                    logger.info("burst: queue empty and nothing in flight")
                    return
                self.redis_ok = True
            except BrokerError as exc:
                self.redis_ok = False
                self._refresh_ready()
                logger.warning("read failed, retrying: %s", exc)
                await asyncio.sleep(BROKER_RETRY_S)
                continue
            for delivery in deliveries:
                self._inflight[delivery.entry_id] = delivery
                task = asyncio.create_task(self._admit(delivery))
                self._admissions.add(task)
                task.add_done_callback(self._admissions.discard)
            self.metrics.inflight.set(len(self._inflight))

    async def _admit(self, delivery: Delivery) -> None:
        """Parse, check, decode and route one entry; errors here settle the job at once."""
        job_id = job_id_of(delivery.fields)
        if delivery.deliveries > self.settings.redis.max_deliveries:
            reason = f"gave up after {delivery.deliveries - 1} deliveries"
            if last_error := self._last_errors.pop(delivery.entry_id, None):
                reason += f"; last error: {last_error}"
            await self._dead_letter(delivery, JobResult.failure(job_id, "max_deliveries", reason))
            return
        started = time.perf_counter()
        queue_ms = 0.0
        try:
            request = JobRequest.decode(delivery.fields)
            self.metrics.jobs_received.labels(request.priority).inc()
            if request.enqueued_ms:
                queue_ms = float(max(now_ms() - request.enqueued_ms, 0))
                self.metrics.queue_wait.observe(queue_ms / 1000)
            self._check_deadline(request)
            if len(request.image) > self.settings.pipeline.max_image_bytes:
                raise ImageTooLargeError(
                    f"image is {len(request.image)} bytes, the limit is {self.settings.pipeline.max_image_bytes}"
                )
            prepared = await self._in_pool(
                self._cpu_pool, prepare, request.image, self.spec, self.settings.pipeline.max_pixels
            )
        except JobError as exc:
            await self._settle([(delivery, JobResult.failure(job_id or delivery.entry_id, exc.code, str(exc)))])
            return
        except Exception:
            logger.exception("unexpected error preparing job %s", job_id)
            failure = JobResult.failure(
                job_id or delivery.entry_id, "internal_error", "internal error preparing the image"
            )
            await self._settle([(delivery, failure)])
            return
        decode_s = time.perf_counter() - started
        self.metrics.decode.observe(decode_s)
        job = Job(delivery, request, prepared, {"queue": queue_ms, "decode": round(decode_s * 1000, 2)})
        if self._batchers[prepared.bucket.id].closed:  # drained while decoding: leave it for the next worker
            self._release([delivery])
            return
        self._batchers[prepared.bucket.id].put(job)

    def _check_deadline(self, request: JobRequest) -> None:
        if request.deadline_ms and now_ms() > request.deadline_ms:
            raise JobExpiredError(f"deadline passed {now_ms() - request.deadline_ms} ms before inference")

    # ---- execution -------------------------------------------------------------------------

    async def _run_bucket(self, bucket: BucketSpec) -> None:
        batcher = self._batchers[bucket.id]
        while True:
            batch = await batcher.next_batch()
            if not batch:
                return
            taken = time.monotonic()
            jobs = []
            for queued_at, job in batch:
                waited = taken - queued_at
                self.metrics.batch_wait.labels(bucket.id).observe(waited)
                job.timings_ms["batch_wait"] = round(waited * 1000, 2)
                jobs.append(job)
            await self._execute(bucket, jobs)

    async def _execute(self, bucket: BucketSpec, jobs: list[Job]) -> None:
        """Infer one batch and settle it; a failed batch is split to isolate the job that broke it."""
        expired = []
        for job in list(jobs):
            try:
                self._check_deadline(job.request)
            except JobExpiredError as exc:
                jobs.remove(job)
                expired.append((job.delivery, JobResult.failure(job.request.job_id, exc.code, str(exc))))
        if expired:
            await self._settle(expired)
        if not jobs:
            return
        tensor, waste = pad_batch([job.prepared for job in jobs])
        started = time.perf_counter()
        try:
            outputs: Outputs = await self._in_pool(self._bucket_pools[bucket.id], self.backend.infer, bucket.id, tensor)
        except Exception as exc:
            await self._batch_failed(bucket, jobs, exc)
            return
        infer_s = time.perf_counter() - started
        self.metrics.inference.labels(bucket.id).observe(infer_s)
        self.metrics.batch_size.labels(bucket.id).observe(len(jobs))
        self.metrics.batch_fill.labels(bucket.id).observe(len(jobs) / bucket.max_batch)
        self.metrics.padding_waste.labels(bucket.id).observe(waste)
        for job in jobs:
            job.timings_ms["inference"] = round(infer_s * 1000, 2)
        results = await self._in_pool(self._cpu_pool, self._postprocess, bucket, jobs, outputs)
        await self._settle(list(zip([j.delivery for j in jobs], results, strict=True)))

    async def _batch_failed(self, bucket: BucketSpec, jobs: list[Job], exc: Exception) -> None:
        if not isinstance(exc, BackendError):
            logger.exception("unexpected backend failure on bucket %s", bucket.id, exc_info=exc)
        if not self.backend.healthy:
            logger.error("backend is unusable (%s); stopping so the worker can be restarted", exc)
            self.exit_code = 1
            self._release([j.delivery for j in jobs])
            self.stop()
            return
        if len(jobs) > 1:
            logger.warning("batch of %d on bucket %s failed (%s); retrying one by one", len(jobs), bucket.id, exc)
            for job in jobs:
                await self._execute(bucket, [job])
            return
        job = jobs[0]
        logger.warning(
            "job %s failed on bucket %s (delivery %d): %s", job.request.job_id, bucket.id, job.delivery.deliveries, exc
        )
        self._last_errors[job.delivery.entry_id] = f"{getattr(exc, 'code', 'backend_error')}: {exc}"
        self._release([job.delivery])  # left pending: retried after the backoff, then dead-lettered

    def _postprocess(self, bucket: BucketSpec, jobs: list[Job], outputs: Outputs) -> list[JobResult]:
        prob_maps = outputs[self.spec.output]
        results = []
        for i, job in enumerate(jobs):
            p = job.prepared
            boxes = text_boxes(
                prob_maps[i, 0, : p.height, : p.width], self.spec.postprocess, p.original_height, p.original_width
            )
            tensors = (
                {name: np.ascontiguousarray(out[i, ..., : p.height, : p.width]) for name, out in outputs.items()}
                if job.request.want_tensors
                else {}
            )
            if job.request.enqueued_ms:
                job.timings_ms["total"] = float(max(now_ms() - job.request.enqueued_ms, 0))
            body = {
                "boxes": boxes,
                "image": {"height": p.original_height, "width": p.original_width},
                "input": {
                    "height": p.height,
                    "width": p.width,
                    "padded_height": p.padded_height,
                    "padded_width": p.padded_width,
                },
                "bucket": bucket.id,
                "batch_size": len(jobs),
                "model": self.spec.name,
                "deliveries": job.delivery.deliveries,
                "timings_ms": job.timings_ms,
            }
            results.append(JobResult(job.request.job_id, "ok", result=body, tensors=tensors))
        return results

    # ---- settling --------------------------------------------------------------------------

    def _release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._inflight.pop(delivery.entry_id, None)
        self.metrics.inflight.set(len(self._inflight))
        self._slot_freed.set()

    async def _settle(self, settlements: list[tuple[Delivery, JobResult]], dead: bool = False) -> None:
        """Write results and ack in one round trip, retrying while Redis is away; never cancelled halfway."""
        while True:
            try:
                if dead:
                    await asyncio.shield(self.broker.settle([], settlements))
                else:
                    await asyncio.shield(self.broker.settle(settlements))
                self.redis_ok = True
                break
            except TransientError as exc:
                self.redis_ok = False
                self._refresh_ready()
                logger.warning("settle failed, retrying: %s", exc)
                await asyncio.sleep(BROKER_RETRY_S)
        end = now_ms()
        for delivery, result in settlements:
            self._last_errors.pop(delivery.entry_id, None)
            self.metrics.jobs_completed.labels(result.status, result.code).inc()
            enqueued = delivery.fields.get(b"enqueued_ms", b"0")
            if enqueued.isdigit() and int(enqueued):
                self.metrics.end_to_end.observe(max(end - int(enqueued), 0) / 1000)
            if dead:
                self.metrics.dead_lettered.labels(result.code).inc()
        self._release([d for d, _ in settlements])

    async def _dead_letter(self, delivery: Delivery, result: JobResult) -> None:
        logger.error("dead-lettering job %s: %s", result.job_id, result.message)
        await self._settle([(delivery, result)], dead=True)
