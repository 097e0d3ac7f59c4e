"""JPEGs decoded by the GPU's JPEG engines (nvImageCodec) into the engine's input, against the CPU path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.support.boxes import unmatched
from worker.compute.graph import engine_output
from worker.compute.imaging import ByteBudget, Limits, Prepared, assemble, prepare
from worker.compute.postprocess import text_boxes
from worker.core.buckets import ModelSpec

pytestmark = pytest.mark.gpu
#: what a user sees must not change: every box scoring at least this from one decode has a
#: counterpart of IoU >= BOX_IOU from the other (decoders differ by under a grey level on average,
#: in chroma upsampling, which can move a box near the detector's 0.5 threshold)
CLEAR_SCORE, BOX_IOU = 0.6, 0.9
LIMITS, BUDGET = Limits(40_000_000, 1 << 30), ByteBudget(1 << 30)


@pytest.fixture(scope="module")
def decoding(trt_backend: Any) -> Any:
    if not trt_backend.decodes_jpeg:
        pytest.skip("GPU test: nvImageCodec is not installed (pip install 'imgworker[gpu]')")
    return trt_backend


def _jpegs(photos: list[Path], size: tuple[int, int] = (512, 384)) -> list[bytes]:
    out = []
    for photo in photos:
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if image is not None:
            out.append(cv2.imencode(".jpg", cv2.resize(image, size), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def _run(lane: Any, spec: ModelSpec, prepared: list[Prepared]) -> tuple[np.ndarray, set[int]]:
    n, h, w = len(prepared), prepared[0].padded_height, prepared[0].padded_width
    assemble(lane.input(n, h, w), [p.slot for p in prepared], spec.preprocess.pad_value())
    compressed = [(i, p.compressed, p.height, p.width) for i, p in enumerate(prepared) if p.compressed]
    maps = np.array(lane.run(n, h, w, compressed)[engine_output(spec)])
    return maps, set(lane.undecodable)


def test_the_gpu_decode_finds_the_boxes_the_cpu_decode_finds(
    decoding: Any, small_spec: ModelSpec, photos: list[Path]
) -> None:
    """Every real photo as a 512x384 JPEG, decoded by the GPU and by OpenCV, run alike: every box
    scoring at least CLEAR_SCORE on one side has a counterpart of IoU >= 0.9 on the other."""
    jpegs = _jpegs(photos)
    clear = missing = weak_missing = 0
    for start in range(0, len(jpegs), 16):
        chunk = jpegs[start : start + 16]
        on_gpu = [prepare(j, small_spec, LIMITS, BUDGET, device_decodes_jpeg=True) for j in chunk]
        on_cpu = [prepare(j, small_spec, LIMITS, BUDGET) for j in chunk]
        assert all(p.compressed for p in on_gpu) and not any(p.compressed for p in on_cpu)
        lane = decoding.lanes(on_gpu[0].bucket.id)[0]
        gpu_maps, failed = _run(lane, small_spec, on_gpu)
        cpu_maps, _ = _run(lane, small_spec, on_cpu)
        assert not failed
        for i, p in enumerate(on_gpu):
            boxes = [
                text_boxes(maps[i, 0, : p.height, : p.width], small_spec.postprocess, p.height, p.width)
                for maps in (gpu_maps, cpu_maps)
            ]
            clear += sum(1 for side in boxes for box in side if box["score"] >= CLEAR_SCORE)
            missing += len(unmatched(boxes[0], boxes[1], BOX_IOU, CLEAR_SCORE))
            missing += len(unmatched(boxes[1], boxes[0], BOX_IOU, CLEAR_SCORE))
            weak_missing += len(unmatched(boxes[0], boxes[1], BOX_IOU, 0.5)) + len(
                unmatched(boxes[1], boxes[0], BOX_IOU, 0.5)
            )
    print(
        f"{len(jpegs)} photos at 512x384: {clear} boxes scoring >= {CLEAR_SCORE} (both ways), {missing} without a "
        f"counterpart of IoU >= {BOX_IOU}; counting every box (>= 0.5): {weak_missing} without one"
    )
    assert clear > 50 and missing == 0


def test_a_corrupt_jpeg_fails_alone_in_its_batch(decoding: Any, small_spec: ModelSpec, photos: list[Path]) -> None:
    good = _jpegs(photos[:3])
    table = good[1].index(b"\xff\xc4") + 5  # the first Huffman table's count of 1-bit codes: more than can exist
    corrupt = good[1][:table] + b"\x05" + good[1][table + 1 :]
    batch = [prepare(j, small_spec, LIMITS, BUDGET, device_decodes_jpeg=True) for j in (good[0], corrupt, good[2])]
    lane = decoding.lanes(batch[0].bucket.id)[0]
    maps, failed = _run(lane, small_spec, batch)
    assert failed == {1}
    alone, _ = _run(lane, small_spec, [batch[0], batch[2]])
    np.testing.assert_array_equal(maps[[0, 2]], alone)  # the neighbours ran as if it were not there


def test_gpu_memory_stays_flat_over_repeated_decodes(decoding: Any, small_spec: ModelSpec, photos: list[Path]) -> None:
    from worker.backends.tensorrt._cuda import free_device_memory

    batch = [prepare(j, small_spec, LIMITS, BUDGET, device_decodes_jpeg=True) for j in _jpegs(photos[:16])]
    lane = decoding.lanes(batch[0].bucket.id)[0]
    for _ in range(20):
        _run(lane, small_spec, batch)
    before = free_device_memory()
    for _ in range(500):
        _run(lane, small_spec, batch)
    grown = (before - free_device_memory()) / (1 << 20)
    print(f"GPU memory over 500 batches of 16 decodes: {grown:+.1f} MiB")
    assert grown < 64
