#!/usr/bin/env python3
"""Worker throughput against a naive baseline, measured in the same run on this machine.

baseline: one process, one image at a time: decode, preprocess, ONNX Runtime, boxes (no Redis).
worker:   the real thing through a local redis-server: submit all, wait for all results.
Prints images/s of both, their ratio, and the worker's p50/p99 latency. Repeats and takes medians.

Usage: python scripts/bench_cpu.py [--repeat 3] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RedisServer, worker_env  # noqa: E402
from tests.support.workers import run_jobs  # noqa: E402
from worker.backends import open_backend  # noqa: E402
from worker.buckets import load_model_spec  # noqa: E402
from worker.imaging import pad_batch, prepare  # noqa: E402
from worker.postprocess import text_boxes  # noqa: E402
from worker.settings import Settings  # noqa: E402


def baseline(images: list[bytes]) -> float:
    settings = Settings.load()
    spec = load_model_spec(settings.model_spec)
    backend = open_backend(spec, settings.onnx_path(spec.onnx), settings.backend)
    try:
        started = time.perf_counter()
        for data in images:
            p = prepare(data, spec, settings.pipeline.max_pixels)
            tensor, _ = pad_batch([p])
            prob = backend.infer(p.bucket.id, tensor)[spec.output]
            text_boxes(prob[0, 0, : p.height, : p.width], spec.postprocess, p.original_height, p.original_width)
        return len(images) / (time.perf_counter() - started)
    finally:
        backend.close()


def worker(images: list[bytes]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            run = run_jobs(worker_env(server.url), list(images))
        finally:
            server.stop()
    rate = len(images) / run.elapsed_s
    totals = sorted(r.result["timings_ms"]["total"] for r in run.results)
    return rate, statistics.median(totals), totals[int(0.99 * (len(totals) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    args = parser.parse_args()
    photos = sorted(p for p in (Settings().assets_dir / "photos").iterdir() if p.suffix.lower() in {".jpg", ".png"})
    images = [p.read_bytes() for p in photos[: args.limit or None]]
    base, work, p50, p99 = [], [], [], []
    for run in range(args.repeat):
        base.append(baseline(images))
        rate, median_ms, tail_ms = worker(images)
        work.append(rate)
        p50.append(median_ms)
        p99.append(tail_ms)
        print(f"run {run + 1}: baseline {base[-1]:.1f} img/s, worker {rate:.1f} img/s", flush=True)
    b, w = statistics.median(base), statistics.median(work)
    print(f"{len(images)} photos, median of {args.repeat} runs")
    print(f"baseline (one at a time, no queue): {b:.1f} images/s")
    print(f"worker (Redis, buckets, batching):   {w:.1f} images/s  = {w / b:.2f}x the baseline")
    print(f"worker latency, whole set submitted at once: p50 {statistics.median(p50):.0f} ms, "
          f"p99 {statistics.median(p99):.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
