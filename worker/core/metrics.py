"""Every Prometheus series of the worker, defined once, on a registry owned by one service.

Per-worker series sum across workers (``sum by (...)``). The queue gauges (``stream_*``) describe
the shared Redis streams, which every worker reports alike: take ``max()`` across workers.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PREFIX = "imgworker"
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the series count and nobody graphs them


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def hist(
            name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = _LATENCY_BUCKETS_S
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=r, buckets=buckets)

        self.build_info = Info(f"{PREFIX}_build", "Version, model, backend and engine of this worker", registry=r)
        self.jobs_received = Counter(f"{PREFIX}_jobs_received", "Jobs read from the streams", ["priority"], registry=r)
        self.jobs_completed = Counter(
            f"{PREFIX}_jobs_completed", "Jobs settled with a final result", ["status", "code"], registry=r
        )
        self.redeliveries = Counter(
            f"{PREFIX}_redeliveries", "Entries claimed again after a lease expired or for a retry", registry=r
        )
        self.isolated_runs = Counter(
            f"{PREFIX}_isolated_runs",
            "Jobs run alone because a worker died running them: how the job that kills workers is found",
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_retries", "Jobs left pending after a transient failure, to be retried", ["code"], registry=r
        )
        self.dead_lettered = Counter(
            f"{PREFIX}_dead_lettered", "Jobs moved to the dead-letter stream", ["code"], registry=r
        )
        self.queue_wait = hist("queue_wait_seconds", "Enqueue to read by a worker", ("priority",))
        self.decode_wait = hist("decode_wait_seconds", "Time a read job waited for a decode thread")
        self.decode = hist("decode_seconds", "Decode, resize and route of one image on a decode thread")
        self.decode_paths = Counter(
            f"{PREFIX}_decode_path",
            "Images by where they are decoded: gpu_hw or gpu_cuda (the engine's device, JPEGs at their input "
            "size: its JPEG engines, or CUDA where it has none) or cpu",
            ["path", "format"],
            registry=r,
        )
        self.batch_wait = hist("batch_wait_seconds", "Time a job waited in its bucket's batcher", ("bucket",))
        self.inference = hist("inference_seconds", "One batch on its lane: assembly, copies and execution", ("bucket",))
        self.engine_step = hist(
            "engine_step_seconds",
            "One batch's steps inside the engine, where the backend times them: lane_wait (for a free lane "
            "of the engine server), inputs (copies in, GPU decoding), context_wait, execute, outputs",
            ("bucket", "step"),
        )
        self.postprocess = hist("postprocess_seconds", "Boxes and result documents of one batch", ("bucket",))
        self.settle = hist("settle_seconds", "One settle round trip to Redis (results stored and acked)")
        self.read = hist("read_seconds", "One read from the streams (a blocking wait on an empty queue included)")
        self.mark = hist(
            "mark_seconds", "A wait to mark entries running: a batch's before it takes its lane, reclaimed ones'"
        )
        self.window_full = Counter(
            f"{PREFIX}_window_full_seconds",
            "Time the intake waited for room in the in-flight window: near 1 per second, jobs in hand "
            "(not reads) set the pace",
            registry=r,
        )
        self.end_to_end = hist("end_to_end_seconds", "Enqueue to result stored", ("bucket", "priority"))
        self.batch_size = hist(
            "batch_size", "Jobs per batch", ("bucket",), buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
        )
        self.batch_fill = hist(
            "batch_fill_ratio", "Batch size over the bucket's max batch", ("bucket",), _RATIO_BUCKETS
        )
        self.padding_waste = hist(
            "padding_waste_ratio", "Share of a batch's pixels that are padding", ("bucket",), _RATIO_BUCKETS
        )
        self.inflight = Gauge(f"{PREFIX}_inflight_jobs", "Jobs read but not yet settled", registry=r)
        self.inflight_capacity = Gauge(
            f"{PREFIX}_inflight_capacity", "Jobs this worker may hold at once (its read-ahead)", registry=r
        )
        self.decode_budget_used = Gauge(
            f"{PREFIX}_decode_budget_used_bytes", "Decoded bytes reserved by running decodes", registry=r
        )
        self.stream_length = Gauge(
            f"{PREFIX}_stream_length",
            "Unfinished jobs in the stream (queue-level: take max() across workers)",
            ["priority"],
            registry=r,
        )
        self.stream_lag = Gauge(
            f"{PREFIX}_stream_lag",
            "Entries not yet read by any worker (queue-level: take max() across workers)",
            ["priority"],
            registry=r,
        )
        self.stream_pending = Gauge(
            f"{PREFIX}_stream_pending",
            "Entries read but not acknowledged (queue-level: take max() across workers)",
            ["priority"],
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when warmed up, Redis answers and the pipeline is healthy", registry=r)
