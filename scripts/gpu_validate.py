#!/usr/bin/env python3
"""Prove the TensorRT backend on a real GPU and write docs/gpu-validation.md with measured figures.

Runs the GPU tests (pytest -m gpu), then measures with the same plan settings:
  - per bucket, GPU compute time of one batch at the profile's opt shape (CUDA events around
    execute_async_v3, after warm-up; median and p90) and the whole lane call (H2D + run + D2H);
  - the worker end to end: a real redis-server, real photos enqueued through Redis, images/s.

Usage (on the GPU machine): python scripts/gpu_validate.py [--spec YAML] [--out FILE] [--no-tf32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RedisServer, worker_env  # noqa: E402
from tests.support.workers import run_jobs  # noqa: E402
from worker.buckets import ModelSpec, load_model_spec  # noqa: E402
from worker.settings import Settings  # noqa: E402


def run_gpu_tests(env: dict[str, str]) -> tuple[str, bool]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rA", "-s", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    summary = next(
        (line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "?"
    )
    worst = re.search(r"max \|TensorRT - ONNX Runtime\|.*", proc.stdout)
    detail = f"{summary.strip('= ')} ({time.monotonic() - started:.0f} s)" + (f"; {worst.group(0)}" if worst else "")
    return detail, proc.returncode == 0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure_buckets(spec: ModelSpec, settings: Settings, iters: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from worker.backends.tensorrt.backend import TensorRTBackend

    rows = []
    with TensorRTBackend(spec, settings.onnx_path(spec.onnx), settings.backend) as backend:
        info = backend.describe()
        rng = np.random.default_rng(0)
        for bucket in spec.buckets:
            n, h, w = bucket.opt
            batch = rng.uniform(-1, 1, (n, spec.channels, h, w)).astype(np.float32)
            lane = backend.lanes[bucket.id].get()
            for _ in range(20):
                lane.run(batch)
            gpu_ms, call_ms = [], []
            for _ in range(iters):
                started = time.perf_counter()
                lane.run(batch)
                call_ms.append((time.perf_counter() - started) * 1000)
                gpu_ms.append(lane.last_gpu_ms)
            backend.lanes[bucket.id].put(lane)
            rows.append(
                {
                    "bucket": bucket.id,
                    "shape": f"{n}x{spec.channels}x{h}x{w}",
                    "gpu_p50": statistics.median(gpu_ms),
                    "gpu_p90": percentile(gpu_ms, 90),
                    "call_p50": statistics.median(call_ms),
                    "call_p90": percentile(call_ms, 90),
                    "img_s": n / (statistics.median(gpu_ms) / 1000),
                }
            )
    return rows, info


def measure_worker(photos: list[Path], repeat: int, workdir: Path) -> dict[str, Any]:
    redis_server = RedisServer(workdir)
    redis_server.start()
    try:
        run = run_jobs(worker_env(redis_server.url), [p.read_bytes() for p in photos] * repeat, timeout_s=900)
    finally:
        redis_server.stop()
    results, elapsed, metrics = run.results, run.elapsed_s, run.metrics
    ok = [r for r in results if r.status == "ok"]
    totals = [r.result["timings_ms"]["total"] for r in ok]
    batches = sum(v for (name, _), v in metrics.items() if name == "imgworker_batch_size_count")
    infer_s = sum(v for (name, _), v in metrics.items() if name == "imgworker_inference_seconds_sum")
    return {
        "jobs": len(results),
        "ok": len(ok),
        "elapsed_s": elapsed,
        "img_s": len(results) / elapsed,
        "p50_ms": statistics.median(totals),
        "p99_ms": percentile(totals, 99),
        "batches": int(batches),
        "mean_batch": len(results) / max(batches, 1),
        "infer_share": infer_s / elapsed,
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=REPO / "tests/gpu/spec_small.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "docs/gpu-validation.md")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=4, help="times each photo is enqueued in the worker run")
    parser.add_argument("--no-tf32", action="store_true", help="measure plain fp32 instead of TensorRT's TF32 default")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    env = dict(os.environ)
    env["IMGWORKER_BACKEND__TENSORRT__TF32"] = "false" if args.no_tf32 else "true"
    tests = ("not run", True) if args.skip_tests else run_gpu_tests(env)

    env.update(IMGWORKER_MODEL_SPEC=str(args.spec), IMGWORKER_BACKEND__KIND="tensorrt")
    os.environ.update(env)
    settings = Settings.load()
    spec = load_model_spec(args.spec)
    from worker.backends.tensorrt.build import plan_for

    started = time.monotonic()
    plan = plan_for(spec, settings.onnx_path(spec.onnx), settings.backend.tensorrt)
    build_s = json.loads(plan.with_suffix(".json").read_text())["build_s"]
    load_s = time.monotonic() - started
    rows, info = measure_buckets(spec, settings, args.iters)
    photos = sorted(p for p in (settings.assets_dir / "photos").iterdir() if p.suffix.lower() in {".jpg", ".png"})
    workdir = Path("/tmp/imgworker-validate")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    e2e = measure_worker(photos, args.repeat, workdir)

    trt = settings.backend.tensorrt
    lines = [
        "# GPU validation",
        "",
        f"Measured {datetime.date.today().isoformat()} by `scripts/gpu_validate.py` on the lent GPU machine.",
        "",
        f"- GPU: {info.get('device')} (compute capability {info.get('compute_capability')}); {e2e['cpus']} CPU cores",
        f"- TensorRT: {info.get('version')} (Python bindings), through the name-based API",
        f"- model: PP-OCRv4 mobile text detector, spec `{args.spec.relative_to(REPO)}` "
        f"({len(spec.buckets)} buckets = {len(spec.buckets)} optimization profiles)",
        f"- build options: optimization level {trt.optimization_level}, TF32 {'on' if trt.tf32 else 'off'}, "
        f"FP16 {'on' if trt.fp16 else 'off'}, tactic sources {', '.join(trt.tactic_sources or ['default'])}",
        f"- plan build: {build_s} s when built; this run found the cached plan and checked it in {load_s:.1f} s",
        f"- GPU tests: {tests[0]}",
        "",
        f"## Per bucket, one batch at the profile's opt shape ({args.iters} runs after 20 warm-up runs)",
        "",
        "GPU = CUDA events around `execute_async_v3` on the bucket's own stream; call = the lane's whole "
        "`run` (pinned copy in, H2D, execute, D2H, wait on the stream), wall clock.",
        "",
        "| bucket | shape | GPU median ms | GPU p90 ms | images/s (GPU) | call median ms | call p90 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['bucket']} | {r['shape']} | {r['gpu_p50']:.3f} | {r['gpu_p90']:.3f} | {r['img_s']:.0f} | "
            f"{r['call_p50']:.3f} | {r['call_p90']:.3f} |"
            for r in rows
        ),
        "",
        "## The worker end to end",
        "",
        f"{e2e['jobs']} jobs ({len(photos)} real photos x {args.repeat}) through a local redis-server: "
        f"submit, decode, preprocess, route, batch, infer, postprocess, store and acknowledge.",
        "",
        f"- {e2e['ok']} ok of {e2e['jobs']}, in {e2e['elapsed_s']:.1f} s: **{e2e['img_s']:.0f} images/s**",
        f"- per-job latency from submission to stored result: p50 {e2e['p50_ms']:.0f} ms, "
        f"p99 {e2e['p99_ms']:.0f} ms (the whole queue was submitted at once)",
        f"- {e2e['batches']} batches, {e2e['mean_batch']:.1f} jobs per batch on average; backend calls (copies and "
        f"execution, summed over the buckets' concurrent lanes) took {100 * e2e['infer_share']:.0f}% of the wall time",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if tests[1] else 1


if __name__ == "__main__":
    sys.exit(main())
