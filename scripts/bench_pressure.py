#!/usr/bin/env python3
"""How fast a worker drains Redis when Redis is at its memory limit, against the same with room.

Each run queues ``--jobs`` JPEGs on a fresh redis-server, then starts a worker with the ``fake``
backend (a fixed cost per image, no model) and times the drain: results stored per second from
the first to the last. "room": no maxmemory. "at the limit": maxmemory set 2 MiB under what Redis
uses once the jobs are queued (noeviction), so Redis refuses every ordinary write until settling
has freed the images; producers are refused meanwhile. Runs alternate; the ratio of the medians
is the figure.

Usage: python scripts/bench_pressure.py [--jobs 1000] [--repeat 3] [--image-ms 2]
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
from worker.client import Client, SubmitError  # noqa: E402

MIB = 1 << 20


def drain_rate(images: list[bytes], at_limit: bool, image_ms: float) -> tuple[float, bool]:
    """(results per second, whether a producer was refused meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        raw = server.client()
        try:
            with Client(server.url) as client:
                job_ids = client.submit_many(images)
                if at_limit:
                    raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) - 2 * MIB)
                refused = False
                env = worker_env(
                    server.url, IMGWORKER_BACKEND__KIND="fake", IMGWORKER_BACKEND__FAKE__IMAGE_MS=str(image_ms)
                )
                with WorkerProcess(env) as worker:
                    worker.wait_ready()
                    if at_limit:
                        try:
                            client.submit(images[0])
                        except SubmitError:
                            refused = True
                    results = client.gather(job_ids, timeout_s=600)
            if len(results) != len(job_ids):
                raise RuntimeError(f"{len(job_ids) - len(results)} jobs without a result")
            finished = sorted(r.result["finished_ms"] for r in results.values())
            return (len(finished) - 1) / ((finished[-1] - finished[0]) / 1000), refused
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--image-ms", type=float, default=2.0, help="the fake backend's cost per image")
    args = parser.parse_args()
    images = resized_jpegs((640, 480), args.jobs)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeat):
        for at_limit in (False, True):
            rate, refused = drain_rate(images, at_limit, args.image_ms)
            rates[at_limit].append(rate)
            label = "at the limit" if at_limit else "room"
            print(f"{label}: {rate:.0f} results/s" + (f", producer refused: {refused}" if at_limit else ""))
            time.sleep(0.5)
    room, limit = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median: room {room:.0f} results/s, at the limit {limit:.0f} results/s, ratio {limit / room:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
