"""The whole worker on the GPU: Redis, real photos, every job answered, the CPU path's boxes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import worker_env
from tests.gpu.conftest import SMALL_SPEC
from tests.support.boxes import DECODED_CLEAR_SCORE, FOUND_IOU, MOVED_SHARE, unmatched
from tests.support.workers import run_jobs
from worker.core.settings import Settings

pytestmark = pytest.mark.gpu
BOX_IOU = 0.9


def _boxes(env: dict[str, str], photos: list[Path], prefix: str) -> dict[str, list[dict]]:  # type: ignore[type-arg]
    run = run_jobs(env, list(photos), prefix=prefix, timeout_s=600)
    return {photo.name: result.result["boxes"] for photo, result in zip(photos, run.results, strict=True)}


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
    on_gpu = _boxes(gpu_env, sample, "gpu")
    on_cpu = _boxes({**common, "IMGWORKER_BACKEND__KIND": "onnxruntime"}, sample, "cpu")
    assert len(on_gpu) == len(on_cpu) == len(sample)
    # Batches form differently on the two runs; padding does not. JPEGs at their input size are
    # decoded by the GPU (on by default), whose pixels differ from libjpeg's by IDCT rounding: no
    # clear box may be lost, and few may move by a pixel (tests/support/boxes.py says why).
    clear = moved = 0
    for name, gpu_boxes in on_gpu.items():
        cpu_boxes = on_cpu[name]
        clear += sum(1 for side in (cpu_boxes, gpu_boxes) for box in side if box["score"] >= DECODED_CLEAR_SCORE)
        for one, other in ((cpu_boxes, gpu_boxes), (gpu_boxes, cpu_boxes)):
            assert not unmatched(one, other, FOUND_IOU, DECODED_CLEAR_SCORE), name
            moved += len(unmatched(one, other, BOX_IOU, DECODED_CLEAR_SCORE))
    print(f"{len(sample)} photos: {clear} clear boxes (both ways), {moved} without a counterpart of IoU >= {BOX_IOU}")
    assert clear > 20  # the sample has real things to find
    assert moved <= MOVED_SHARE * clear
