"""Worker processes for end-to-end tests: started as users start them, observed from outside."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.support.redis_server import RedisServer
from worker.client import Client, ImageInput
from worker.core.protocol import JobResult
from worker.core.settings import RedisSettings
from worker.transport.broker import Broker

REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PORT_LINE = re.compile(r"metrics and health on http://[^:]+:(\d+)/metrics")


class WorkerProcess:
    """``python -m worker run`` in a subprocess; its log is collected for assertions and failures."""

    def __init__(self, env: dict[str, str], *args: str, repo: Path = REPO) -> None:
        """``repo``: the checkout to run (another one's worker against this one's tests)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self.port is None and (match := PORT_LINE.search(line)):
                self.port = int(match.group(1))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def consumer(self) -> str:
        """The consumer name the worker logged at start: its pending entries are held under it."""
        line = next(line for line in self.lines if " consumer " in line)
        return line.split(" consumer ")[1].split(",")[0]

    def get(self, path: str) -> tuple[int, str]:
        assert self.port is not None, self.log
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log}")
            if self.port is not None and self.get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log}")

    def metrics(self) -> Samples:
        """Samples of /metrics keyed by (name, sorted labels)."""
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait(self, timeout_s: float = 120) -> int:
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker still running after {timeout_s} s:\n{self.log}") from None
        self._close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_descendants(pids: list[int]) -> list[int]:
    """The processes and every process they started (a supervisor's workers and engine servers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = list(pids), list(pids)
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def engine_servers(pids: list[int]) -> list[int]:
    """The engine servers (``serve-engine``) among these processes and their descendants."""
    found = []
    for pid in with_descendants(pids):
        try:
            if b"serve-engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: quick leases and retries so fault tests run fast."""
    env = dict(os.environ)
    env.update(
        {
            "IMGWORKER_REDIS__URL": redis_url,
            "IMGWORKER_METRICS__PORT": "0",
            "IMGWORKER_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def client_settings(env: dict[str, str]) -> RedisSettings:
    """The Redis settings a worker started with ``env`` uses, for a client that must agree with it."""
    return RedisSettings(
        url=env["IMGWORKER_REDIS__URL"],
        prefix=env.get("IMGWORKER_REDIS__PREFIX", "imgworker"),
        cluster=env.get("IMGWORKER_REDIS__CLUSTER", "false").lower() in {"1", "true", "yes"},
        shards=int(env.get("IMGWORKER_REDIS__SHARDS", "1")),
    )


@dataclass(frozen=True)
class Run:
    results: list[JobResult]  # in submission order
    metrics: Samples  # /metrics just before the worker was stopped
    #: the steady window, between 10% and 90% of the results: images/s, and CPU cores the worker
    #: (and the redis-server processes, when their pids are given) used on average in it
    steady_rate: float
    #: images/s while every worker process was busy: from the last one's first result to the first
    #: one's last (workers that start late, or run dry early, do not count against it)
    busy_rate: float
    worker_cores: float
    redis_cores: float
    #: of ``worker_cores``, what the engine servers (``serve-engine``) used
    server_cores: float
    #: CPU seconds the redis-server processes spent taking the submissions (before any worker started)
    redis_submit_core_s: float

    @property
    def per_core(self) -> float:
        return self.steady_rate / max(self.worker_cores, 1e-9)

    @property
    def in_worker_ms(self) -> list[float]:
        """Each successful job's time from a worker reading it to its result: with the whole backlog
        queued up front, the time from enqueueing would mostly measure the queue."""
        ok = [r.result["timings_ms"] for r in self.results if r.status == "ok"]
        return [timings["total"] - timings["queue"] for timings in ok]


class CpuSampler:
    """CPU seconds of some processes, sampled on a thread, read back at any wall-clock time."""

    def __init__(self, pids: list[int], interval_s: float = 0.05) -> None:
        self.pids = pids
        self.samples: list[tuple[float, float]] = []  # (wall clock, CPU seconds of all pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        seen: dict[int, float] = {}  # a child that exits keeps the CPU time it had used
        while not self._stop.is_set():
            for pid in with_descendants(self.pids):
                try:
                    seen[pid] = cpu_seconds(pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
            self.samples.append((time.time(), sum(seen.values())))
            self._stop.wait(interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, wall: float) -> float:
        times = [t for t, _ in self.samples]
        return float(np.interp(wall, times, [c for _, c in self.samples]))


def wait_until_settled(settings: RedisSettings, deadline: float) -> None:
    """Poll until no job is left in the streams (settled entries are deleted), or the deadline
    (monotonic) passes. Results are collected after: a client collecting them as they come would
    take CPU from the workers being measured (about a core at several thousand results/s)."""

    async def poll() -> None:
        broker = Broker(settings)
        try:
            while await broker.backlog() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await broker.aclose()

    asyncio.run(poll())


def run_jobs(
    env: dict[str, str],
    images: Sequence[ImageInput],
    *,
    prefix: str = "imgworker",
    timeout_s: float = 1800,
    redis_pids: tuple[int, ...] = (),
    workers: int = 1,
    args: tuple[str, ...] = (),
) -> Run:
    """Submit every image, then start ``workers`` worker processes (each ``run`` with ``args``), wait
    until every job is settled, collect the results, SIGTERM the workers.

    The whole backlog is in Redis before a worker starts, so the workers, not the client's
    submission rate, set the pace; the steady window comes from the workers' own completion times
    (each result's enqueue time plus its end-to-end time), so the workers' start-up does not
    distort the figure, and results are collected only once the workers are done.
    """
    env = {**env, "IMGWORKER_REDIS__PREFIX": prefix}
    redis_cpu = CpuSampler(list(redis_pids)) if redis_pids else None
    with Client(redis_settings=client_settings(env)) as client:
        submit_started = time.time()
        ids = client.submit_many(images)
        submit_ended = time.time()
        processes = [WorkerProcess(env, *args) for _ in range(workers)]
        try:
            worker_cpu = CpuSampler([w.process.pid for w in processes])
            for worker in processes:
                worker.wait_ready(900)
            server_cpu = CpuSampler(engine_servers([w.process.pid for w in processes]))
            deadline = time.monotonic() + timeout_s
            wait_until_settled(client_settings(env), deadline)
            results = client.gather(ids, timeout_s=max(deadline - time.monotonic(), 1.0))
            worker_cpu.stop()
            server_cpu.stop()
            if redis_cpu:
                redis_cpu.stop()
            logs = "\n".join(w.log[-2000:] for w in processes)
            assert len(results) == len(ids), f"{len(ids) - len(results)} jobs without a result:\n{logs}"
            metrics: Samples = {}
            for worker in processes:
                for key, value in worker.metrics().items():
                    metrics[key] = metrics.get(key, 0.0) + value
            for worker in processes:
                worker.process.send_signal(signal.SIGTERM)
            for worker in processes:
                assert worker.wait(60) == 0, worker.log
        finally:
            for worker in processes:
                worker.kill()
    ordered = [results[job_id] for job_id in ids]
    done = sorted(r.result["finished_ms"] / 1000 for r in ordered if r.status == "ok")
    low, high = done[len(done) // 10], done[len(done) * 9 // 10]
    window = max(high - low, 1e-9)
    return Run(
        ordered,
        metrics,
        steady_rate=(len(done) * 9 // 10 - len(done) // 10) / window,
        busy_rate=_busy_rate([r.result for r in ordered if r.status == "ok"]),
        worker_cores=(worker_cpu.at(high) - worker_cpu.at(low)) / window,
        redis_cores=(redis_cpu.at(high) - redis_cpu.at(low)) / window if redis_cpu else 0.0,
        server_cores=(server_cpu.at(high) - server_cpu.at(low)) / window,
        redis_submit_core_s=redis_cpu.at(submit_ended) - redis_cpu.at(submit_started) if redis_cpu else 0.0,
    )


def _busy_rate(bodies: list[dict[str, Any]]) -> float:
    """Results per second between the last worker's first result and the first worker's last."""
    by_worker: dict[str, list[float]] = {}
    for body in bodies:
        by_worker.setdefault(body["worker"], []).append(body["finished_ms"] / 1000)
    start = max(min(times) for times in by_worker.values())
    end = min(max(times) for times in by_worker.values())
    inside = sum(1 for times in by_worker.values() for t in times if start < t <= end)
    return inside / (end - start) if end > start else 0.0


def run_on_fresh_redis(
    images: Sequence[ImageInput],
    extra_env: dict[str, str],
    *,
    workers: int = 1,
    args: tuple[str, ...] = (),
    timeout_s: float = 1800,
) -> Run:
    """``run_jobs`` against a redis-server of its own, whose CPU is measured too."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            assert server.process is not None
            env = worker_env(server.url, **extra_env)
            return run_jobs(
                env, images, redis_pids=(server.process.pid,), workers=workers, args=args, timeout_s=timeout_s
            )
        finally:
            server.stop()


def run_on_fresh_cluster(
    images: Sequence[ImageInput],
    extra_env: dict[str, str],
    *,
    shards: int = 12,
    workers: int = 1,
    args: tuple[str, ...] = (),
    timeout_s: float = 1800,
) -> Run:
    """``run_jobs`` against a Redis Cluster of its own (three masters, a replica each), jobs in
    ``shards`` shards; Redis CPU is every node's."""
    from tests.support.redis_cluster import Cluster

    with tempfile.TemporaryDirectory() as workdir:
        nodes = Cluster(Path(workdir))
        nodes.start()
        try:
            pids = tuple(process.pid for process in nodes.processes.values())
            sharded = {"IMGWORKER_REDIS__CLUSTER": "true", "IMGWORKER_REDIS__SHARDS": str(shards)}
            env = worker_env(nodes.url, **extra_env, **sharded)
            return run_jobs(env, images, redis_pids=pids, workers=workers, args=args, timeout_s=timeout_s)
        finally:
            nodes.stop()
