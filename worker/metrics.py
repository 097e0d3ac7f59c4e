"""Every Prometheus series of the worker, defined once, on a registry owned by one service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "imgworker"
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def hist(
            name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = _LATENCY_BUCKETS_S
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=r, buckets=buckets)

        self.jobs_received = Counter(f"{PREFIX}_jobs_received", "Jobs read from the streams", ["priority"], registry=r)
        self.jobs_completed = Counter(
            f"{PREFIX}_jobs_completed", "Jobs settled with a final result", ["status", "code"], registry=r
        )
        self.redeliveries = Counter(
            f"{PREFIX}_redeliveries", "Entries claimed again after a lease or retry", registry=r
        )
        self.dead_lettered = Counter(
            f"{PREFIX}_dead_lettered", "Jobs moved to the dead-letter stream", ["code"], registry=r
        )
        self.queue_wait = hist("queue_wait_seconds", "Enqueue to read by a worker")
        self.decode = hist("decode_seconds", "Decode and preprocess of one image")
        self.batch_wait = hist("batch_wait_seconds", "Time a job waited in its bucket's batcher", ("bucket",))
        self.inference = hist("inference_seconds", "Backend time of one batch", ("bucket",))
        self.end_to_end = hist("end_to_end_seconds", "Enqueue to result stored")
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
        self.stream_lag = Gauge(
            f"{PREFIX}_stream_lag", "Entries not yet delivered to the group", ["priority"], registry=r
        )
        self.stream_pending = Gauge(
            f"{PREFIX}_stream_pending", "Entries delivered but not acknowledged", ["priority"], registry=r
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when warmed up, Redis answers and the backend is healthy", registry=r)
        self.backend_info = Info(f"{PREFIX}_backend", "The inference backend in use", registry=r)
