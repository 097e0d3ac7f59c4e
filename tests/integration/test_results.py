"""Results are right: parity with direct ONNX Runtime, batch independence, real text found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.conftest import worker_env
from tests.support.boxes import unmatched
from tests.support.workers import WorkerProcess
from worker.client import Client
from worker.compute.graph import engine_output
from worker.compute.imaging import ByteBudget, Limits, prepare
from worker.core.buckets import ModelSpec

pytestmark = pytest.mark.slow
BOX_IOU = 0.9
LIMITS = Limits(40_000_000, 512 << 20)

# Hand-drawn regions (x0, y0, x1, y1) of the five text lines on the sign in opencv-doc's
# examples/text/scenetext01.jpg (800x600): NOTICE, DOUBLE, PARKING, PROHIBITED, AT ALL TIMES.
SCENETEXT01_LINES = [
    (280, 35, 432, 78),
    (276, 85, 425, 122),
    (276, 128, 425, 165),
    (273, 170, 424, 207),
    (284, 212, 408, 252),
]


@pytest.fixture
def worker(redis_url: str) -> Iterator[WorkerProcess]:
    process = WorkerProcess(worker_env(redis_url))
    process.wait_ready()
    yield process
    process.kill()


def _rect_iou(box: list[list[float]], rect: tuple[int, int, int, int]) -> float:
    pts = np.array(box)
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    ix = max(0.0, min(x1, rect[2]) - max(x0, rect[0]))
    iy = max(0.0, min(y1, rect[3]) - max(y0, rect[1]))
    inter = ix * iy
    union = (x1 - x0) * (y1 - y0) + (rect[2] - rect[0]) * (rect[3] - rect[1]) - inter
    return float(inter / union)


def _sample(photos: list[Path], spec: ModelSpec) -> list[Path]:
    """Two photos per bucket, so every profile is checked."""
    picked: dict[str, list[Path]] = {}
    for photo in photos:
        bucket = prepare(photo.read_bytes(), spec, LIMITS, ByteBudget(LIMITS.max_decoded_bytes)).bucket.id
        if len(picked.setdefault(bucket, [])) < 2:
            picked[bucket].append(photo)
    assert set(picked) == {b.id for b in spec.buckets}
    return [p for group in picked.values() for p in group]


def _reference_map(photo: Path, spec: ModelSpec, session: ort.InferenceSession, body: dict[str, Any]) -> np.ndarray:
    """The probability map computed without any worker code: OpenCV decode and resize, the float
    normalisation by hand, padding with the worker's documented value, the original model."""
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)  # EXIF orientation applied, as the worker does
    h, w = body["input"]["height"], body["input"]["width"]
    ph, pw = body["input"]["padded_height"], body["input"]["padded_width"]
    padded = np.full((ph, pw, 3), 128, np.uint8)
    padded[:h, :w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    normalised = (padded.astype(np.float32) / 255 - 0.5) / 0.5
    (prob,) = session.run([spec.output], {spec.input: normalised.transpose(2, 0, 1)[None]})
    return np.asarray(prob[0, :, :h, :w])


def test_output_tensor_equals_direct_onnxruntime(
    worker: WorkerProcess, redis_url: str, photos: list[Path], spec: ModelSpec, onnx_path: Path
) -> None:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compared = 0
    with Client(redis_url) as client:
        for photo in _sample(photos, spec):
            with Image.open(photo) as image:
                if image.mode not in ("RGB", "L"):
                    continue  # alpha or 16-bit: OpenCV's imread would not composite them as the worker does
            result = client.wait(client.submit(photo, tensors=True), timeout_s=120)  # alone: no companions
            assert result.status == "ok", result.message
            tensor = result.tensors[engine_output(spec)]
            reference = _reference_map(photo, spec, session, result.result)
            assert tensor.shape == reference.shape
            assert np.abs(tensor.astype(np.float32) - np.round(reference * 255)).max() <= 1, photo.name
            compared += 1
    assert compared >= 6, f"only {compared} photos compared"


def test_boxes_do_not_depend_on_batch_companions(
    worker: WorkerProcess, redis_url: str, photos: list[Path], spec: ModelSpec
) -> None:
    """Photos of different sizes that pad to one shape: boxes alone equal boxes in a shared batch."""
    groups: dict[tuple[str, int, int], dict[tuple[int, ...], list[Path]]] = {}
    for photo in photos:
        p = prepare(photo.read_bytes(), spec, LIMITS, ByteBudget(LIMITS.max_decoded_bytes))
        by_size = groups.setdefault((p.bucket.id, p.padded_height, p.padded_width), {})
        by_size.setdefault(p.image.shape, []).append(photo)
    by_size = max(groups.values(), key=len)  # the padded shape holding the most distinct input sizes
    group = [paths[i] for i in range(2) for paths in by_size.values() if i < len(paths)][:8]
    assert len(by_size) >= 2 and len(group) >= 3
    with Client(redis_url) as client:
        alone = {p: client.wait(client.submit(p), timeout_s=120) for p in group}
        together_ids = client.submit_many(group)
        results = client.wait_many(together_ids, timeout_s=120)
    together = {p: results[j] for p, j in zip(group, together_ids, strict=True)}
    assert max(r.result["batch_size"] for r in together.values()) > 1, "the group must have shared a batch"
    assert all(r.result["batch_size"] == 1 for r in alone.values())
    for photo in group:
        single, batched = alone[photo].result["boxes"], together[photo].result["boxes"]
        assert len(single) == len(batched), photo.name
        assert not unmatched(single, batched, BOX_IOU, min_score=0.0), photo.name


def test_the_sign_text_in_scenetext01_is_found(worker: WorkerProcess, redis_url: str, assets_dir: Path) -> None:
    with Client(redis_url) as client:
        result = client.wait(client.submit(assets_dir / "photos" / "opencv-text-scenetext01.jpg"), timeout_s=120)
    assert result.status == "ok"
    boxes = result.result["boxes"]
    for line in SCENETEXT01_LINES:
        assert max(_rect_iou(b["points"], line) for b in boxes) >= 0.6, line
