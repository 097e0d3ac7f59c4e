#!/usr/bin/env python3
"""How far one Redis goes: worker processes added against one redis-server (and against a local
three-master Redis Cluster), with the fake backend, so the engine costs nothing.

For each image size (JPEGs of about 60 KB and 500 KB) and worker count (1, 2, 4, 8 independent
`worker run` processes), every job is submitted up front; the steady-window throughput, the CPU the
workers used and the CPU redis-server used are measured. redis-server runs one thread: its CPU per
image, and the bytes it moves, say where it stops scaling on any machine.

Usage: python scripts/bench_redis.py [--workers 1,2,4,8] [--jobs 4000] [--cluster] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.corpus import resized_jpegs  # noqa: E402
from tests.support.workers import Run, run_on_fresh_cluster, run_on_fresh_redis  # noqa: E402

#: (label, JPEG size, quality, share of --jobs): about 60 KB and 500 KB from the sample photos; the
#: large ones fewer, so both take Redis about the same bytes and time
SIZES = (("640x480", (640, 480), 92, 1.0), ("1600x1200", (1600, 1200), 97, 0.25))
SHARDS = 12
FAKE = {"IMGWORKER_BACKEND__KIND": "fake", "IMGWORKER_PIPELINE__DECODE_THREADS": "2"}


def row_of(run: Run, images: list[bytes], workers: int) -> dict[str, Any]:
    mean_bytes = sum(map(len, images)) / len(images)
    return {
        "workers": workers,
        "img_s": run.steady_rate,
        "worker_cores": run.worker_cores,
        "redis_cores": run.redis_cores,
        "mb_s": run.steady_rate * mean_bytes / 1e6,
        # Redis's CPU per image on both sides: taking the submission, and serving the workers
        "redis_submit_core_ms_per_image": 1000 * run.redis_submit_core_s / len(images),
        "redis_work_core_ms_per_image": 1000 * run.redis_cores / max(run.steady_rate, 1e-9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per run of the small images")
    parser.add_argument("--cluster", action="store_true", help="also against a local three-master cluster")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    targets = ["redis", *(["cluster"] if args.cluster else [])]
    for label, size, quality, share in SIZES:
        images = resized_jpegs(size, int(args.jobs * share), quality)
        kb = sum(map(len, images)) / len(images) / 1000
        for target in targets:
            for workers in args.workers:
                if target == "redis":
                    run = run_on_fresh_redis(images, FAKE, workers=workers)
                else:
                    run = run_on_fresh_cluster(images, FAKE, shards=SHARDS, workers=workers)
                row = row_of(run, images, workers)
                row |= {"size": label, "kb": round(kb), "target": target}
                rows.append(row)
                if args.json:  # after every row: a run cut short keeps what it measured
                    measured = {"cpus": len(os.sched_getaffinity(0)), "shards": SHARDS, "rows": rows}
                    args.json.write_text(json.dumps(measured, indent=1))
                print(
                    f"{target:7} {label:9} ({kb:.0f} KB) {workers} workers: {row['img_s']:7.0f} img/s, "
                    f"{row['mb_s']:6.1f} MB/s, workers {row['worker_cores']:.2f} cores, "
                    f"redis {row['redis_cores']:.2f} cores, core-ms per image: "
                    f"{row['redis_submit_core_ms_per_image']:.3f} to submit, "
                    f"{row['redis_work_core_ms_per_image']:.3f} to work",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
