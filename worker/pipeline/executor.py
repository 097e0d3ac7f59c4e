"""One bucket's execution: assemble a batch into a lane, run it, postprocess, one outcome per job.

Every job that enters ``infer`` comes back with exactly one outcome, whatever raises: a final
result to settle (ok, expired, or internal_error for a bug) or a Retry (a transient failure: left
pending, charged an attempt). A failing batch is split and rerun one job at a time, so one bad
input fails alone. Lanes run on threads of their own; postprocessing runs on the shared CPU pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from worker.backends.base import Backend, Lane
from worker.compute.graph import engine_output
from worker.compute.imaging import Prepared, assemble
from worker.compute.postprocess import text_boxes
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import BackendError, DecodeError, JobExpiredError, TransientError
from worker.core.metrics import Metrics
from worker.core.protocol import Delivery, JobRequest, JobResult, Settlement, now_ms

logger = logging.getLogger(__name__)


@dataclass
class Job:
    delivery: Delivery
    request: JobRequest
    prepared: Prepared
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.prepared.padded_height, self.prepared.padded_width

    def expired(self) -> JobExpiredError | None:
        deadline = self.request.deadline_ms
        if deadline and now_ms() > deadline:
            return JobExpiredError(f"deadline passed {now_ms() - deadline} ms before inference")
        return None

    def failure(self, code: str, message: str) -> Settlement:
        result = JobResult.failure(self.request.job_id, code, message)
        return result.settlement(self.delivery, self.prepared.bucket.id, self.request.enqueued_ms)


@dataclass(frozen=True)
class Retry:
    """A transient failure: the job stays pending, charged one attempt, and is delivered again."""

    job: Job
    error: TransientError


@dataclass(frozen=True)
class Inferred:
    """A job's outputs, cropped to its valid region and copied out of the lane."""

    job: Job
    outputs: dict[str, npt.NDArray[Any]]
    batch_size: int


Outcome = Settlement | Retry


class BucketExecutor:
    def __init__(
        self,
        bucket: BucketSpec,
        spec: ModelSpec,
        backend: Backend,
        metrics: Metrics,
        cpu_pool: Executor,
        *,
        worker: str,
    ) -> None:
        self.bucket = bucket
        self.worker = worker  # named in every result: which worker (host, pid) ran the job
        self.spec = spec
        self.backend = backend
        self.metrics = metrics
        self.lanes = backend.lanes(bucket.id)
        self._cpu_pool = cpu_pool
        self._lane_threads = ThreadPoolExecutor(len(self.lanes), thread_name_prefix=f"lane-{bucket.id}")
        self._pad = spec.preprocess.pad_value()
        labels = {"bucket": bucket.id}
        self._inference = metrics.inference.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self._batch_fill = metrics.batch_fill.labels(**labels)
        self._padding_waste = metrics.padding_waste.labels(**labels)
        self._postprocess = metrics.postprocess.labels(**labels)
        self.batch_wait = metrics.batch_wait.labels(**labels)
        self._output = engine_output(spec)
        #: batches inside a lane right now: the backend may be closed only at zero
        self.running = 0
        self._running_lock = threading.Lock()

    def shutdown(self) -> None:
        self._lane_threads.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self, lane: Lane) -> None:
        """One batch at the profile's opt shape, so the first job does not pay for lazy set-up."""
        n, h, w = self.bucket.opt

        def run() -> None:
            lane.input(n, h, w)[:] = self._pad
            lane.run(n, h, w)

        await self._on_lane_thread(run)

    async def _on_lane_thread(self, fn: Any, *args: Any) -> Any:
        """Counted until the thread is done, not until the await ends: a cancelled wait leaves it running."""
        with self._running_lock:
            self.running += 1
        future = self._lane_threads.submit(fn, *args)
        future.add_done_callback(self._lane_done)
        return await asyncio.wrap_future(future)

    def _lane_done(self, _: object) -> None:
        with self._running_lock:
            self.running -= 1

    async def infer(self, lane: Lane, jobs: list[Job]) -> list[Inferred | Outcome]:
        """Run one batch on ``lane``; one entry per job, in no particular order."""
        done: list[Inferred | Outcome] = []
        live = []
        for job in jobs:
            if (expired := job.expired()) is not None:
                done.append(job.failure(expired.code, str(expired)))
            else:
                live.append(job)
        if not live:
            return done
        started = time.perf_counter()
        try:
            outputs, waste, steps = await self._on_lane_thread(self._run_on_lane, lane, live)
        except Exception as exc:
            return done + await self._failed(lane, live, exc)
        infer_s = time.perf_counter() - started
        self._inference.observe(infer_s)
        self._batch_size.observe(len(live))
        self._batch_fill.observe(len(live) / self.bucket.max_batch)
        self._padding_waste.observe(waste)
        for step, seconds in steps.items():
            self.metrics.engine_step.labels(bucket=self.bucket.id, step=step).observe(seconds)
        for job, out in zip(live, outputs, strict=True):
            if out is None:
                done.append(job.failure(DecodeError.code, "JPEG could not be decoded (corrupt data)"))
                continue
            job.timings_ms["inference"] = round(infer_s * 1000, 2)
            done.append(Inferred(job, out, len(live)))
        return done

    def _run_on_lane(
        self, lane: Lane, jobs: list[Job]
    ) -> tuple[list[dict[str, npt.NDArray[Any]] | None], float, dict[str, float]]:
        """On the lane's thread: pixels straight into the lane's buffer (JPEGs to the device, which
        decodes them into their slots), run, copy out valid regions; None for a JPEG the device
        could not decode. With the padding's share and the engine's own step timings."""
        height, width = jobs[0].padded_shape
        n = len(jobs)
        waste = assemble(lane.input(n, height, width), [job.prepared.slot for job in jobs], self._pad)
        compressed = [
            (i, p.compressed, p.height, p.width) for i, p in enumerate(job.prepared for job in jobs) if p.compressed
        ]
        outputs = lane.run(n, height, width, compressed)
        crops: list[dict[str, npt.NDArray[Any]] | None] = []
        for i, job in enumerate(jobs):
            if i in lane.undecodable:
                crops.append(None)
                continue
            h, w = job.prepared.height, job.prepared.width
            wanted = outputs.items() if job.request.want_tensors else [(self._output, outputs[self._output])]
            crops.append({name: out[i, ..., :h, :w].copy() for name, out in wanted})
        return crops, waste, dict(lane.timings)

    async def _failed(self, lane: Lane, jobs: list[Job], exc: Exception) -> list[Inferred | Outcome]:
        if not self.backend.healthy:
            logger.error("backend is unusable (%s); its jobs are left for other workers", exc)
            error = exc if isinstance(exc, BackendError) else BackendError(str(exc))
            return [Retry(job, error) for job in jobs]
        if len(jobs) > 1:
            logger.warning("batch of %d on bucket %s failed (%s); rerunning one by one", len(jobs), self.bucket.id, exc)
            return [outcome for job in jobs for outcome in await self.infer(lane, [job])]
        job = jobs[0]
        if isinstance(exc, TransientError):
            logger.warning(
                "job %s failed on bucket %s (attempt %d): %s",
                job.request.job_id,
                self.bucket.id,
                job.delivery.attempts + 1,
                exc,
            )
            return [Retry(job, exc)]
        logger.error("job %s hit a bug on bucket %s", job.request.job_id, self.bucket.id, exc_info=exc)
        return [job.failure("internal_error", f"internal error running the batch: {type(exc).__name__}")]

    async def postprocess(self, inferred: list[Inferred]) -> list[Settlement]:
        """Boxes and encoded results for a batch, on the CPU pool."""
        started = time.perf_counter()
        settlements: list[Settlement] = await asyncio.get_running_loop().run_in_executor(
            self._cpu_pool, self._results, inferred
        )
        self._postprocess.observe(time.perf_counter() - started)
        return settlements

    def _results(self, inferred: list[Inferred]) -> list[Settlement]:
        out = []
        for item in inferred:
            try:
                out.append(self._result(item))
            except Exception:
                logger.exception("postprocessing job %s failed", item.job.request.job_id)
                out.append(item.job.failure("internal_error", "internal error building the result"))
        return out

    def _result(self, item: Inferred) -> Settlement:
        job, p = item.job, item.job.prepared
        started = time.perf_counter()
        boxes = text_boxes(item.outputs[self._output][0], self.spec.postprocess, p.original_height, p.original_width)
        job.timings_ms["postprocess"] = round((time.perf_counter() - started) * 1000, 2)
        finished_ms = now_ms()
        if job.request.enqueued_ms:
            job.timings_ms["total"] = float(max(finished_ms - job.request.enqueued_ms, 0))
        run = {
            "bucket": self.bucket.id,
            "batch_size": item.batch_size,
            "model": self.spec.name,
            "deliveries": job.delivery.deliveries,
            "attempts": job.delivery.attempts + 1,
            "timings_ms": job.timings_ms,
            "finished_ms": finished_ms,
            "worker": self.worker,
        }
        result = JobResult.success(
            job.request.job_id,
            boxes=boxes,
            image=(p.original_height, p.original_width),
            model_input=(p.height, p.width, p.padded_height, p.padded_width),
            run=run,
            tensors=item.outputs if job.request.want_tensors else {},
        )
        return result.settlement(job.delivery, self.bucket.id, job.request.enqueued_ms)
