"""Worker processes for end-to-end tests: started as users start them, observed from outside."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from worker.client import Client, ImageInput
from worker.protocol import JobResult

REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PORT_LINE = re.compile(r"metrics and health on http://[^:]+:(\d+)/metrics")


class WorkerProcess:
    """``python -m worker run`` in a subprocess; its log is collected for assertions and failures."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            cwd=REPO,
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
            self.process.kill()
            raise AssertionError(f"worker still running after {timeout_s} s:\n{self.log}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Run:
    results: list[JobResult]  # in submission order
    elapsed_s: float  # first submission to last result
    metrics: Samples  # /metrics just before the worker was stopped


def run_jobs(env: dict[str, str], images: list[ImageInput], prefix: str = "imgworker", timeout_s: float = 1800) -> Run:
    """Start a worker, submit every image at once, wait for all results, stop it with SIGTERM."""
    env = {**env, "IMGWORKER_REDIS__PREFIX": prefix}
    worker = WorkerProcess(env)
    try:
        worker.wait_ready(900)
        with Client(env["IMGWORKER_REDIS__URL"], prefix=prefix) as client:
            started = time.monotonic()
            ids = client.submit_many(images)
            results = client.wait_many(ids, timeout_s=timeout_s)
            elapsed_s = time.monotonic() - started
        metrics = worker.metrics()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.kill()
    return Run([results[job_id] for job_id in ids], elapsed_s, metrics)
