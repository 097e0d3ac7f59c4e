#!/usr/bin/env python3
"""What waiting for many results costs: the client's CPU and redis-server's CPU per collected result.

A thread stores results the way the settle script does (result hash + one element on the job's
done list), in rounds of 50 every 5 ms, while ``Client.gather`` collects them all; no worker runs,
so the figures are the waiter's alone. Every producer that uses ``enqueue --wait`` or ``wait_many``
pays this, and redis-server's share comes out of the same single thread that serves the workers.

Usage: python scripts/bench_wait.py [--jobs 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.redis_server import RedisServer  # noqa: E402
from worker.client import Client  # noqa: E402
from worker.core.protocol import JobResult, Keys  # noqa: E402

ROUND = 50
ROUND_PAUSE_S = 0.005


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(jobs: int) -> dict[str, float]:
    keys = Keys()
    ids = [f"job-{i}" for i in range(jobs)]
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            raw = redis.Redis.from_url(server.url)

            def produce() -> None:
                for start in range(0, jobs, ROUND):
                    pipe = raw.pipeline(transaction=False)
                    for job_id in ids[start : start + ROUND]:
                        fields = JobResult(job_id=job_id, status="ok").encode()
                        pipe.hset(keys.result(job_id), items=[x for kv in fields.items() for x in kv])
                        pipe.rpush(keys.done(job_id), "ok")
                    pipe.execute()
                    time.sleep(ROUND_PAUSE_S)

            # the producer alone first, to subtract its Redis CPU from the waiter's run
            before = redis_cpu_s(raw)
            produce()
            stored = redis_cpu_s(raw) - before
            raw.flushall()
            producer = threading.Thread(target=produce)
            with Client(server.url) as client:
                redis_before, cpu_before, started = redis_cpu_s(raw), time.thread_time(), time.monotonic()
                producer.start()
                results = client.gather(ids, timeout_s=300)
                took, client_cpu = time.monotonic() - started, time.thread_time() - cpu_before
                producer.join()
                redis_used = redis_cpu_s(raw) - redis_before - stored
            assert len(results) == jobs, f"{jobs - len(results)} results missing"
            return {
                "seconds": took,
                "client_ms": 1000 * client_cpu / jobs,
                "redis_ms": 1000 * max(redis_used, 0.0) / jobs,
            }
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [measure(args.jobs) for _ in range(args.repeat)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    pace = args.jobs / (args.jobs / ROUND * ROUND_PAUSE_S)
    print(
        f"{args.jobs} results stored at up to {pace:.0f}/s, median of {args.repeat}: all collected in "
        f"{median['seconds']:.2f} s; waiter {median['client_ms']:.3f} client CPU ms and "
        f"{median['redis_ms']:.3f} redis-server CPU ms per result"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
