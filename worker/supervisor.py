"""``imgworker run --processes N [--gpus LIST]``: several worker processes, one engine per GPU.

A single Python process is held back by its GIL long before a large GPU is busy, so a GPU is fed
by N worker processes. They share one engine server per GPU (``serve-engine``), which owns the
device: every execution context lives in one CUDA context, where their work overlaps (separate
processes on one GPU are time-sliced instead). ONNX Runtime runs N independent workers.

The supervisor restarts a child that dies (with backoff), forwards SIGTERM so every worker drains
within the grace period, and serves one port for the pod: /healthz, /readyz (ready when every
worker is) and /metrics (every worker's series, labelled ``worker``).
"""

from __future__ import annotations

import logging
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from worker.core.settings import Settings, environment, usable_cores
from worker.http import serve_http
from worker.transport.connection import redact

logger = logging.getLogger(__name__)
PORT_LINE = re.compile(r"metrics and health on http://[^:]+:(\d+)/metrics")
POLL_S = 0.5
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


@dataclass
class Child:
    """One supervised process: a worker, or the engine server of a GPU."""

    name: str
    argv: list[str]
    env: dict[str, str]
    role: str  # "worker" | "engine"
    process: subprocess.Popen[str] | None = None
    port: int | None = None
    restarts: int = 0
    next_start: float = 0.0
    finished: bool = False

    def start(self) -> None:
        self.port = None
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._relay, args=(self.process,), name=f"log-{self.name}", daemon=True).start()

    def _relay(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(f"[{self.name}] {line}")
            if self.port is None and (match := PORT_LINE.search(line)):
                self.port = int(match.group(1))
        process.stdout.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def get(self, path: str) -> tuple[int, str]:
        if self.port is None:
            return 0, ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""


class WorkersCollector(Collector):
    """Every worker's /metrics at scrape time, each series labelled with its worker."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for child in self.children:
            status, text = child.get("/metrics")
            if status != 200:
                continue
            for family in text_string_to_metric_families(text):
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "worker": child.name}, sample.value)
        yield from merged.values()


class Supervisor:
    def __init__(self, settings: Settings, processes: int, gpus: list[int], burst: bool) -> None:
        self.settings = settings
        self.burst = burst
        self.stopping = False
        self._socket_dir = Path(tempfile.mkdtemp(prefix="imgworker-"))
        # what the command line set reaches the children too; their ports stay private
        passed_on = {"redis": {"url": settings.redis.url}, "log_level": settings.log_level}
        private = {"metrics": {"host": "127.0.0.1", "port": 0}}
        base = {**os.environ, "PYTHONUNBUFFERED": "1", **environment(passed_on), **environment(private)}
        # one group of N workers per GPU; a backend that is not TensorRT runs a single group
        groups: list[int | None] = list(gpus) if settings.backend.kind == "tensorrt" else [None]
        if "IMGWORKER_PIPELINE__DECODE_THREADS" not in os.environ:
            base |= environment({"pipeline": {"decode_threads": decode_threads_each(processes * len(groups))}})
        run = [sys.executable, "-m", "worker", "run", *(["--burst"] if burst else [])]
        self.children: list[Child] = []
        # ONNX Runtime computes on the CPU: independent processes scale with cores. Any other
        # backend stands for a device that one engine server per GPU must own.
        shared_engine = processes > 1 and settings.backend.kind != "onnxruntime"
        for gpu in groups:
            device = {} if gpu is None else environment({"backend": {"tensorrt": {"device": gpu}}})
            tag = "" if gpu is None else f"gpu{gpu}-"
            worker_env = {**base, **device}
            if shared_engine:
                socket_path = self._socket_dir / f"{tag}engine.sock"
                self.children.append(
                    Child(
                        f"{tag}engine",
                        [sys.executable, "-m", "worker", "serve-engine", "--socket", str(socket_path)],
                        {**base, **device},
                        "engine",
                    )
                )
                worker_env |= environment({"backend": {"kind": "remote", "remote": {"address": socket_path}}})
            for index in range(processes):
                self.children.append(Child(f"{tag}worker-{index}", run, worker_env, "worker"))

    @property
    def workers(self) -> list[Child]:
        return [c for c in self.children if c.role == "worker"]

    def ready(self) -> bool:
        return not self.stopping and all(c.alive() and c.get("/readyz")[0] == 200 for c in self.workers)

    def stop(self) -> None:
        if not self.stopping:
            logger.info("stopping: SIGTERM to %d workers", len(self.workers))
        self.stopping = True
        for child in self.workers:
            child.signal(signal.SIGTERM)

    def run(self) -> int:
        """Supervise until a stop (or, in burst mode, until every worker has finished)."""
        registry = CollectorRegistry()
        registry.register(WorkersCollector(self.workers))
        server = None
        if self.settings.metrics.enabled:
            server = serve_http(self.settings.metrics.host, self.settings.metrics.port, registry, self.ready)
            logger.info("metrics and health on http://%s:%d/metrics", *server.server_address[:2])
        logger.info(
            "supervising %d workers and %d engine servers, redis %s",
            len(self.workers),
            len(self.children) - len(self.workers),
            redact(self.settings.redis.url),
        )
        try:
            return self._loop()
        finally:
            self._shutdown()
            if server is not None:
                server.shutdown()

    def _loop(self) -> int:
        config_error = False
        while True:
            now = time.monotonic()
            for child in self.children:
                if child.finished or child.alive() or now < child.next_start:
                    continue
                if child.process is not None:  # it ended
                    code = child.process.returncode
                    if self.stopping or (self.burst and child.role == "worker" and code == 0):
                        child.finished = True
                        continue
                    if code == 2:  # a configuration error does not pass by restarting
                        logger.error("%s exited with a configuration error; not restarting it", child.name)
                        config_error = child.finished = True
                        continue
                    delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                    logger.warning("%s exited with status %s; restarting in %d s", child.name, code, delay)
                    child.restarts += 1
                    child.next_start = now + delay
                    child.process = None
                    continue
                if self.stopping:
                    child.finished = True
                    continue
                child.start()
            if all(c.finished for c in self.workers):
                return 2 if config_error else 0
            time.sleep(POLL_S)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for child in self.workers:
            child.signal(signal.SIGTERM)
        while any(c.alive() for c in self.workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self.children:  # engine servers last: the workers' batches needed them
            child.signal(signal.SIGTERM)
        while any(c.alive() for c in self.children) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        for child in self.children:
            child.signal(signal.SIGKILL)
        for child in self.children:
            if child.process is not None:
                child.process.wait()
        for path in self._socket_dir.glob("*"):
            path.unlink(missing_ok=True)
        self._socket_dir.rmdir()


def decode_threads_each(workers: int) -> int:
    """The usable cores shared out among the worker processes of every GPU, at least two each.

    More threads only contend for each process's GIL, which costs CPU per image; fewer than two
    cost throughput: on the H200 (16 cores, fp32) 1 thread per process gave 4581-4699 images/s
    at 10-16 processes, 2-3 threads 4794-5051 at 8-10 (docs/measurements/notes.md).
    """
    return max(2, usable_cores() // workers)


def visible_gpus(spec: str) -> list[int]:
    """``all`` (every GPU NVML or CUDA reports) or a comma-separated list of ordinals."""
    if spec != "all":
        return [int(part) for part in spec.split(",") if part.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        return list(range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # no NVML: ask CUDA
        from worker.backends import device_count

        return list(range(device_count()))


def supervise(settings: Settings, processes: int, gpus: str, burst: bool) -> int:
    devices = visible_gpus(gpus) if gpus else [settings.backend.tensorrt.device]
    supervisor = Supervisor(settings, processes, devices, burst)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop())
    return supervisor.run()
