"""The whole worker on the CPU backend: real Redis, real model, 150+ real photos plus malformed inputs."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from tests.conftest import REPO, worker_env
from tests.support.workers import WorkerProcess
from worker.core.protocol import Keys

pytestmark = pytest.mark.slow
KEYS = Keys()


def _malformed_inputs(photos: list[Path], into: Path) -> dict[str, str]:
    """Writes the bad inputs; returns file name -> the error code each must get ("" = ok)."""
    into.mkdir()
    jpeg = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    files = {
        "empty.jpg": (b"", "decode_error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "decode_error"),
        "random.jpg": (np.random.default_rng(7).bytes(20_000), "decode_error"),
        "notes.txt": (b"this is a text file, not an image\n", "decode_error"),
        "bomb.png": (bomb, "image_too_large"),
        "one_pixel.png": (cv2.imencode(".png", np.full((1, 1, 3), 128, np.uint8))[1].tobytes(), ""),
    }
    for name, (data, _) in files.items():
        (into / name).write_bytes(data)
    return {name: code for name, (_, code) in files.items()}


def test_every_input_gets_exactly_one_result(
    redis_url: str, redis_client: redis.Redis, photos: list[Path], tmp_path: Path
) -> None:
    assert len(photos) >= 150
    expected_codes = _malformed_inputs(photos, tmp_path / "bad")
    # a wrongly typed entry written by hand, as a broken producer in another language might
    redis_client.xadd(KEYS.stream(1), {"v": 1, "id": "hand-written", "priority": "urgent", "image": b"\xff\xd8"})

    worker = WorkerProcess(worker_env(redis_url))
    try:
        worker.wait_ready()
        enqueue = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker",
                "enqueue",
                "--redis-url",
                redis_url,
                "--wait",
                "--json",
                "--timeout",
                "600",
                str(photos[0].parent),
                str(tmp_path / "bad" / "*"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert enqueue.returncode == 1, enqueue.stderr  # some inputs are not images: their jobs failed
        lines = [json.loads(line) for line in enqueue.stdout.splitlines()]
        assert "summary:" in enqueue.stderr
        metrics = worker.metrics()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.kill()

    assert len(lines) == len(photos) + len(expected_codes)
    assert len({line["path"] for line in lines}) == len(lines)
    by_name = {Path(line["path"]).name: line for line in lines}
    for photo in photos:
        line = by_name[photo.name]
        assert line["status"] == "ok", line
        assert line["result"]["image"]["height"] > 0 and isinstance(line["result"]["boxes"], list)
    for name, code in expected_codes.items():
        line = by_name[name]
        if code:
            assert (line["status"], line["code"]) == ("error", code), line
            assert line["message"]
        else:
            assert line["status"] == "ok", line

    hand_written = json.loads(redis_client.hget(KEYS.result("hand-written"), "json"))  # type: ignore[arg-type]
    assert hand_written["status"] == "error" and hand_written["code"] == "invalid_job"
    assert "priority" in hand_written["message"]

    # never a second notification (the waiting client took the first), nothing left in the streams
    for line in lines:
        assert redis_client.exists(KEYS.result(line["job_id"]))
        assert redis_client.llen(KEYS.done(line["job_id"])) <= 1
    for stream in KEYS.streams:
        assert redis_client.xlen(stream) == 0
        assert redis_client.xpending(stream, "workers")["pending"] == 0

    # the metrics agree with what was processed
    ok_count = sum(1 for line in lines if line["status"] == "ok")
    assert metrics[("imgworker_jobs_completed_total", (("code", ""), ("status", "ok")))] == ok_count
    assert metrics[("imgworker_jobs_completed_total", (("code", "decode_error"), ("status", "error")))] == 4
    assert metrics[("imgworker_jobs_completed_total", (("code", "image_too_large"), ("status", "error")))] == 1
    assert metrics[("imgworker_jobs_completed_total", (("code", "invalid_job"), ("status", "error")))] == 1
    batches = sum(v for (name, _), v in metrics.items() if name == "imgworker_batch_size_count")
    batched_jobs = sum(v for (name, _), v in metrics.items() if name == "imgworker_batch_size_sum")
    assert batched_jobs == ok_count
    assert batches < batched_jobs  # jobs really shared batches
    assert metrics[("imgworker_inflight_jobs", ())] == 0
    assert metrics[("imgworker_ready", ())] == 1
