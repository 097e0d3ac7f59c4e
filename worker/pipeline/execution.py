"""Execution: each bucket's batcher and a runner per lane. A runner takes a batch only when its
lane is free (so batches fill while it runs), marks it running, runs it, and hands the outcome to
postprocessing and settling off the lane."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from worker.backends.base import Backend, Lane
from worker.core.buckets import ModelSpec
from worker.core.metrics import Metrics
from worker.core.protocol import Delivery, Settlement
from worker.pipeline.batcher import Batcher
from worker.pipeline.executor import BucketExecutor, Inferred, Job, Retry
from worker.pipeline.lifecycle import Lifecycle
from worker.pipeline.settler import Marks, Settler

logger = logging.getLogger(__name__)


class Execution:
    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        *,
        settler: Settler,
        marks: Marks,
        metrics: Metrics,
        lifecycle: Lifecycle,
        cpu_pool: ThreadPoolExecutor,
        consumer: str,
    ) -> None:
        self._backend = backend
        self._settler = settler
        self._marks = marks
        self._lifecycle = lifecycle
        self.executors = {
            b.id: BucketExecutor(b, spec, backend, metrics, cpu_pool, worker=consumer) for b in spec.buckets
        }
        self.batchers: dict[str, Batcher[Job]] = {
            b.id: Batcher(b, lambda job: job.padded_shape, priority_of=lambda job: job.request.priority)
            for b in spec.buckets
        }

    def idle(self) -> bool:
        """No batch runs inside the backend: only then may it be closed."""
        return all(ex.running == 0 for ex in self.executors.values())

    async def warm_up(self) -> None:
        """One batch per lane at its opt shape: ready only after every profile has run."""

        async def bucket(executor: BucketExecutor) -> None:
            started = time.perf_counter()
            for lane in executor.lanes:
                await executor.warm_up(lane)
            elapsed_ms = (time.perf_counter() - started) * 1000
            logger.info(
                "bucket %s warmed up (%d lanes) in %.0f ms", executor.bucket.id, len(executor.lanes), elapsed_ms
            )

        await asyncio.gather(*(bucket(ex) for ex in self.executors.values()))

    def start(self) -> list[asyncio.Task[None]]:
        return [
            self._lifecycle.spawn(self._run_lane(executor, lane))
            for executor in self.executors.values()
            for lane in executor.lanes
        ]

    def take_unstarted(self) -> list[Delivery]:
        """Close the batchers and take what no lane has started."""
        unstarted = []
        for batcher in self.batchers.values():
            batcher.close()
            unstarted += [job.delivery for job in batcher.take_all()]
        return unstarted

    def close(self) -> None:
        """No more batches: each runner ends once its batcher is empty."""
        for batcher in self.batchers.values():
            batcher.close()

    def shutdown(self) -> None:
        for executor in self.executors.values():
            executor.shutdown()

    async def _run_lane(self, executor: BucketExecutor, lane: Lane) -> None:
        batcher = self.batchers[executor.bucket.id]
        while batch := await batcher.next_batch():
            taken = time.monotonic()
            jobs = []
            for queued_at, job in batch:
                waited = taken - queued_at
                executor.batch_wait.observe(waited)
                job.timings_ms["batch_wait"] = round(waited * 1000, 2)
                jobs.append(job)
            await self._marks.running([job.delivery for job in jobs])
            outcomes = await executor.infer(lane, jobs)
            self._lifecycle.spawn(self._finish(executor, outcomes))

    async def _finish(self, executor: BucketExecutor, outcomes: list[Inferred | Settlement | Retry]) -> None:
        """Postprocess off the lane, then settle: the lane is already running its next batch."""
        settlements = [o for o in outcomes if isinstance(o, Settlement)]
        retries = [o for o in outcomes if isinstance(o, Retry)]
        inferred = [o for o in outcomes if isinstance(o, Inferred)]
        if inferred:
            settlements += await executor.postprocess(inferred)
        await self._settler.settle(settlements)
        await self._settler.retry_later([(r.job.delivery, r.error) for r in retries])
        if not self._backend.healthy:
            self._lifecycle.fail("the backend is unusable; stopping so the worker is restarted")
