#!/usr/bin/env python3
"""How long a high-priority job waits behind a backlog of low-priority ones.

A worker with the ``fake`` backend (a fixed cost per image, no model) gets ``--backlog`` low-priority
jobs (priority 2); once its in-flight window is full of them, ``--probes`` high-priority jobs
(priority 0) are submitted, one every ``--probe-every`` seconds, all while the backlog lasts.
Printed: the high-priority end-to-end latency (submit to result stored) as p50 / p95 / max, and
how long the backlog took, so the figures of two checkouts compare in one run (``--worker-repo``
runs the worker from another checkout, say a ``git worktree`` of an earlier commit; the producer
side is this one's).

Usage: python scripts/bench_priority.py [--backlog 2000] [--probes 20] [--image-ms 10] [--worker-repo DIR]
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

from tests.support.corpus import resized_jpegs  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.workers import WorkerProcess, worker_env  # noqa: E402
from worker.client import Client  # noqa: E402


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    server = RedisServer(workdir)
    server.start()
    repo = Path(args.worker_repo).resolve()
    env = worker_env(server.url, IMGWORKER_BACKEND__KIND="fake", IMGWORKER_BACKEND__FAKE__IMAGE_MS=str(args.image_ms))
    env["PYTHONPATH"] = str(repo)
    worker = WorkerProcess(env, repo=repo)
    try:
        worker.wait_ready()
        images = resized_jpegs((320, 240), args.backlog + args.probes)
        with Client(server.url) as client:
            started = time.monotonic()
            backlog = client.submit_many(images[: args.backlog], priority=2)
            while worker.metrics()[("imgworker_inflight_jobs", ())] < 100:  # the window fills with low-priority work
                time.sleep(0.05)
            probes: dict[str, float] = {}  # job id -> submitted (Unix ms, the clock of finished_ms)
            for image in images[args.backlog :]:
                probes[client.submit(image, priority=0)] = time.time() * 1000
                time.sleep(args.probe_every)
            results = client.wait_many(probes, timeout_s=600)
            latencies = [(results[j].result["finished_ms"] - sent) / 1000 for j, sent in probes.items()]
            steps = {step for r in results.values() for step in r.result.get("timings_ms", {})}
            medians = {
                s: statistics.median(r.result["timings_ms"].get(s, 0.0) for r in results.values()) for s in steps
            }
            client.wait_many(backlog, timeout_s=600)
            backlog_s = time.monotonic() - started
        latencies.sort()
        return {
            "p50_ms": statistics.median(latencies) * 1000,
            "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
            "max_ms": latencies[-1] * 1000,
            "backlog_s": backlog_s,
            **{f"median {step} ms": value for step, value in sorted(medians.items())},
        }
    finally:
        worker.kill()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--probe-every", type=float, default=0.2, help="seconds between high-priority jobs")
    parser.add_argument("--image-ms", type=float, default=10.0, help="the fake backend's cost per image")
    parser.add_argument("--worker-repo", default=str(REPO), help="checkout the worker runs from")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args, Path(tmp))
    print(
        f"worker {args.worker_repo}: high priority behind {args.backlog} low: p50 {figures['p50_ms']:.0f} ms, "
        f"p95 {figures['p95_ms']:.0f} ms, max {figures['max_ms']:.0f} ms; backlog done in {figures['backlog_s']:.1f} s"
    )
    print(
        "  where a high-priority job spends its time: "
        + ", ".join(
            f"{name.removeprefix('median ')} {value:.0f}"
            for name, value in figures.items()
            if name.startswith("median")
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
