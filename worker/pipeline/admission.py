"""Admission: what intake holds becomes jobs in the batchers. Parse and check on the loop, decode
in chunks on the CPU pool; an entry that cannot become a job gets its error result here, alone."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from worker.backends.base import Backend
from worker.compute.imaging import ByteBudget, Limits, Prepared, prepare
from worker.core.buckets import ModelSpec
from worker.core.errors import ImageTooLargeError, JobError, JobExpiredError
from worker.core.metrics import Metrics
from worker.core.protocol import PRIORITIES, Delivery, JobRequest, JobResult, Settlement, now_ms, valid_job_id
from worker.core.settings import PipelineSettings
from worker.pipeline.batcher import Batcher
from worker.pipeline.executor import Job
from worker.pipeline.lifecycle import Lifecycle
from worker.pipeline.settler import Marks, Settler

logger = logging.getLogger(__name__)
#: entries decoded per task on the CPU pool: a future per chunk, not per job
MAX_CHUNK = 8


class Admission:
    def __init__(
        self,
        *,
        settings: PipelineSettings,
        spec: ModelSpec,
        backend: Backend,
        batchers: dict[str, Batcher[Job]],
        settler: Settler,
        marks: Marks,
        metrics: Metrics,
        lifecycle: Lifecycle,
        cpu_pool: ThreadPoolExecutor,
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._backend = backend
        self._batchers = batchers
        self._settler = settler
        self._marks = marks
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._cpu_pool = cpu_pool
        self.budget = ByteBudget(settings.decode_budget_mib << 20)
        self._limits = Limits(settings.max_pixels, self.budget.capacity)
        self._received = {p: metrics.jobs_received.labels(p) for p in PRIORITIES}
        self._queue_wait = {p: metrics.queue_wait.labels(p) for p in PRIORITIES}
        metrics.decode_budget_used.set_function(lambda: self.budget.used)

    def admit(self, deliveries: list[Delivery]) -> None:
        """Parse and check on the loop; decode in chunks on the CPU pool."""
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
                limit = self._settings.max_image_bytes
                if len(request.image) > limit:
                    raise ImageTooLargeError(f"image is {len(request.image)} bytes, the limit is {limit}")
                accepted.append((delivery, request, queue_ms))
            except JobError as exc:
                failures.append(_failure(delivery, request, exc.code, str(exc)))
        if failures:
            self._lifecycle.spawn(self._settler.settle(failures))
        size = max(1, min(MAX_CHUNK, -(-len(accepted) // self._settings.decode_threads)))
        for start in range(0, len(accepted), size):
            self._lifecycle.spawn(self._decode(accepted[start : start + size]), admission=True)

    async def _decode(self, chunk: list[tuple[Delivery, JobRequest, float]]) -> None:
        """Decode one chunk on a CPU thread; each image then goes to its bucket's batcher or fails alone."""
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self._cpu_pool, self._prepare_many, [request.image for _, request, _ in chunk], time.perf_counter()
        )
        failures, left = [], []
        for (delivery, request, queue_ms), (wait_s, prepared) in zip(chunk, outcomes, strict=True):
            if isinstance(prepared, JobError):
                failures.append(_failure(delivery, request, prepared.code, str(prepared)))
                continue
            if isinstance(prepared, BaseException):
                logger.error("unexpected error preparing entry %s", delivery.key, exc_info=prepared)
                failures.append(_failure(delivery, request, "internal_error", "internal error preparing the image"))
                continue
            self._metrics.decode_wait.observe(wait_s)
            self._metrics.decode.observe(prepared.decode_s)
            path = self._backend.jpeg_decode if prepared.compressed else "cpu"
            self._metrics.decode_paths.labels(path, prepared.format).inc()
            timings = {
                "queue": queue_ms,
                "decode_wait": round(wait_s * 1000, 2),
                "decode": round(prepared.decode_s * 1000, 2),
            }
            batcher = self._batchers[prepared.bucket.id]
            if batcher.closed:  # drained while decoding: left for the next worker
                left.append(delivery)
            else:
                batcher.put(Job(delivery, request, prepared, timings))
                self._marks.waiting(delivery)
        await self._settler.settle(failures)
        if left:
            await self._settler.leave(left)

    def _prepare_many(self, images: list[bytes], submitted: float) -> list[tuple[float, Prepared | Exception]]:
        out: list[tuple[float, Prepared | Exception]] = []
        for image in images:
            wait_s = time.perf_counter() - submitted
            try:
                prepared = prepare(image, self._spec, self._limits, self.budget, self._backend.decodes_jpeg)
                out.append((wait_s, prepared))
            except Exception as exc:  # one bad image fails alone; the caller turns it into its result
                out.append((wait_s, exc))
        return out


def _failure(delivery: Delivery, request: JobRequest | None, code: str, message: str) -> Settlement:
    # An id that is missing, not UTF-8 or too long is never altered: the entry id stands in for it.
    job_id = request.job_id if request else valid_job_id(delivery.fields.get(b"id")) or delivery.entry_id
    enqueued_ms = request.enqueued_ms if request else 0
    return JobResult.failure(job_id, code, message).settlement(delivery, enqueued_ms=enqueued_ms)
