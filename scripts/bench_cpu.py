#!/usr/bin/env python3
"""The worker's CPU side against a one-image-at-a-time loop, measured in the same run on this machine.

baseline: one thread, one image at a time, no Redis: decode, resize, the backend, boxes.
worker:   the real thing, `python -m worker run` against a local redis-server: every job submitted
          up front; throughput and CPU use are taken in the steady window (10% to 90% of results).

With ``--backend fake`` (a recorded probability map, no model) this is the ceiling of everything
around the engine: images/s per CPU core the worker used, the figure that says how many cores a
GPU needs to be fed. Photos are re-encoded as JPEGs of one size (default 640x480, quality 90).

Usage: python scripts/bench_cpu.py [--backend fake|onnxruntime] [--jobs N] [--size 640x480] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.corpus import resized_jpegs  # noqa: E402
from tests.support.workers import run_on_fresh_redis  # noqa: E402
from worker.backends import open_backend  # noqa: E402
from worker.compute.graph import engine_output  # noqa: E402
from worker.compute.imaging import ByteBudget, Limits, prepare  # noqa: E402
from worker.compute.postprocess import text_boxes  # noqa: E402
from worker.core.buckets import load_model_spec  # noqa: E402
from worker.core.settings import Settings  # noqa: E402


def baseline(images: list[bytes], settings: Settings) -> float:
    """Images per second of one thread doing one image at a time (its CPU time: one core)."""
    spec = load_model_spec(settings.model_spec)
    backend = open_backend(spec, settings.onnx_path(spec.onnx), settings.backend)
    limits = Limits(settings.pipeline.max_pixels, 1 << 30)
    budget = ByteBudget(1 << 30)
    output = engine_output(spec)
    try:
        started = time.process_time()
        for data in images:
            p = prepare(data, spec, limits, budget)
            lane = backend.lanes(p.bucket.id)[0]
            lane.input(1, p.height, p.width)[0] = p.pixels
            prob = lane.run(1, p.height, p.width)[output]
            text_boxes(prob[0, 0], spec.postprocess, p.original_height, p.original_width)
        return len(images) / (time.process_time() - started)
    finally:
        backend.close()


def measure_worker(images: list[bytes], extra_env: dict[str, str], processes: int) -> dict[str, float]:
    run = run_on_fresh_redis(list(images), extra_env, args=("--processes", str(processes)))
    latencies = run.in_worker_ms
    assert len(latencies) == len(images), "every job must succeed"
    return {
        "img_s": run.steady_rate,
        "cores": run.worker_cores,
        "per_core": run.per_core,
        "redis_cores": run.redis_cores,
        "p50_ms": statistics.median(latencies),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("fake", "onnxruntime"), default="onnxruntime")
    parser.add_argument("--jobs", type=int, help="jobs per worker run (default: 2000 fake, 200 onnxruntime)")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-ms", type=float, default=0.0, help="fake backend: milliseconds per batch")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (run --processes)")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    jobs = args.jobs or (2000 if args.backend == "fake" else 200)
    images = resized_jpegs((width, height), jobs)
    env = {"IMGWORKER_BACKEND__KIND": args.backend}
    if args.backend == "fake":
        env["IMGWORKER_BACKEND__FAKE__BATCH_MS"] = str(args.batch_ms)
    settings = Settings.load(backend={"kind": args.backend, "fake": {"batch_ms": args.batch_ms}})
    runs = []
    for run in range(args.repeat):
        base = baseline(images[: min(len(images), 300)], settings)
        worker = measure_worker(images, env, args.processes)
        runs.append({"baseline_img_s": base, **worker})
        print(
            f"run {run + 1}: baseline {base:.1f} img/s on one core; worker {worker['img_s']:.1f} img/s "
            f"on {worker['cores']:.2f} cores = {worker['per_core']:.1f} img/s per core",
            flush=True,
        )
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    what = f"backend {args.backend}, {args.processes} process(es)"
    print(f"{jobs} {width}x{height} JPEGs, {what}, median of {args.repeat} runs")
    print(f"baseline (one thread, one image at a time, no queue): {median['baseline_img_s']:.1f} images/s per core")
    print(
        f"worker (Redis, buckets, batching): {median['img_s']:.1f} images/s on {median['cores']:.2f} cores = "
        f"{median['per_core']:.1f} images/s per core ({median['per_core'] / median['baseline_img_s']:.2f}x the "
        f"baseline's per-core rate); redis-server used {median['redis_cores']:.2f} cores"
    )
    latency = f"p50 {median['p50_ms']:.0f} ms, p99 {median['p99_ms']:.0f} ms"
    print(f"worker latency, read to result, all submitted at once: {latency}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"backend": args.backend, "size": args.size, "jobs": jobs, "processes": args.processes, **median}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
