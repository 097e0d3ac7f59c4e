"""The whole worker on the GPU: Redis, real photos, every job answered, boxes equal to the CPU path."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import worker_env
from tests.gpu.conftest import SMALL_SPEC
from tests.support.boxes import CLEAR_SCORE, unmatched
from tests.support.workers import WorkerProcess
from worker.client import Client
from worker.settings import Settings

pytestmark = pytest.mark.gpu
BOX_IOU = 0.9


def _run_all(redis_url: str, env: dict[str, str], photos: list[Path], prefix: str) -> dict[str, dict]:  # type: ignore[type-arg]
    env = {**env, "IMGWORKER_REDIS__PREFIX": prefix}
    worker = WorkerProcess(env)
    try:
        worker.wait_ready(600)
        with Client(redis_url, prefix=prefix) as client:
            ids = client.submit_many(photos)
            results = client.wait_many(ids, timeout_s=600)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.kill()
    return {photo.name: results[job_id].result for photo, job_id in zip(photos, ids, strict=True)}


def test_gpu_worker_answers_every_job_like_the_cpu_worker(
    gpu_settings: Settings, redis_url: str, photos: list[Path]
) -> None:
    sample = photos[:60]
    common = worker_env(redis_url, IMGWORKER_MODEL_SPEC=str(SMALL_SPEC))
    gpu_env = {
        **common,
        "IMGWORKER_BACKEND__KIND": "tensorrt",
        "IMGWORKER_BACKEND__TENSORRT__TF32": "false",
        "IMGWORKER_BACKEND__TENSORRT__PLAN_DIR": str(gpu_settings.backend.tensorrt.plan_dir),
    }
    on_gpu = _run_all(redis_url, gpu_env, sample, "gpu")
    on_cpu = _run_all(redis_url, {**common, "IMGWORKER_BACKEND__KIND": "onnxruntime"}, sample, "cpu")
    assert len(on_gpu) == len(on_cpu) == len(sample)
    # Batches form differently on the two runs; padding does not, so every clear box matches both ways.
    clear = 0
    for name, gpu_result in on_gpu.items():
        cpu_boxes, gpu_boxes = on_cpu[name]["boxes"], gpu_result["boxes"]
        clear += sum(1 for box in cpu_boxes if box["score"] >= CLEAR_SCORE)
        assert not unmatched(cpu_boxes, gpu_boxes, BOX_IOU, CLEAR_SCORE), name
        assert not unmatched(gpu_boxes, cpu_boxes, BOX_IOU, CLEAR_SCORE), name
    assert clear > 20  # the sample has real things to find
