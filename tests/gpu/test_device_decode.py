"""JPEGs decoded by the GPU's JPEG engines (nvImageCodec) into the engine's input, against the CPU path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.support.boxes import DECODED_CLEAR_SCORE, FOUND_IOU, MOVED_SHARE, unmatched
from worker.compute.graph import engine_output
from worker.compute.imaging import ByteBudget, Limits, Prepared, assemble, prepare
from worker.compute.postprocess import text_boxes
from worker.core.buckets import ModelSpec

pytestmark = pytest.mark.gpu
#: what a user sees must not change: clear boxes from one decode have a counterpart from the other
#: (the thresholds: tests/support/boxes.py)
CLEAR_SCORE, SAME_IOU = DECODED_CLEAR_SCORE, 0.9
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
    """Every real photo as a 512x384 JPEG, decoded by the GPU and by OpenCV, run alike: no clear box
    is lost or added, and few move by more than IoU 0.9."""
    jpegs = _jpegs(photos)
    clear = moved = lost = 0
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
            gpu, cpu = (
                text_boxes(maps[i, 0, : p.height, : p.width], small_spec.postprocess, p.height, p.width)
                for maps in (gpu_maps, cpu_maps)
            )
            clear += sum(1 for side in (gpu, cpu) for box in side if box["score"] >= CLEAR_SCORE)
            for one, other in ((gpu, cpu), (cpu, gpu)):
                moved += len(unmatched(one, other, SAME_IOU, CLEAR_SCORE))
                lost += len(unmatched(one, other, FOUND_IOU, CLEAR_SCORE))
    print(
        f"{len(jpegs)} photos at 512x384: {clear} boxes scoring >= {CLEAR_SCORE} (both ways); {moved} without a "
        f"counterpart of IoU >= {SAME_IOU}, {lost} without one of IoU >= {FOUND_IOU}"
    )
    assert clear > 50 and lost == 0 and moved <= MOVED_SHARE * clear


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


def test_gpu_memory_stays_flat_over_200000_decodes_of_mixed_sizes(
    decoding: Any, small_spec: ModelSpec, photos: list[Path]
) -> None:
    """A decoder writes into its pool, never a fresh allocation per batch: 200,000 real photos at
    five sizes (most smaller than their slot), a corrupt JPEG in every tenth batch, four lanes'
    batches at once so that the decoder merges them."""
    from worker.backends.tensorrt._cuda import DeviceBuffer, free_device_memory
    from worker.backends.tensorrt.jpeg_decoder import DeviceJpegDecoder

    sizes = [(512, 512), (512, 416), (448, 480), (480, 448), (416, 512)]
    jpegs = [_jpegs(photos[k :: len(sizes)][:16], size) for k, size in enumerate(sizes)]
    table = jpegs[0][1].index(b"\xff\xc4") + 5
    corrupt = jpegs[0][1][:table] + b"\x05" + jpegs[0][1][table + 1 :]
    n, height, width = decoding.spec.bucket("m512").max
    lanes = 4
    decoding.device.bind()
    targets = [DeviceBuffer(n * height * width * 3) for _ in range(lanes)]
    decoder = DeviceJpegDecoder(decoding.nvimgcodec, decoding.device, 0, (height, width), lanes * n)

    def batch(k: int) -> set[int]:
        w, h = sizes[k % len(sizes)]
        items = [(i, data, h, w) for i, data in enumerate(jpegs[k % len(sizes)][:n])]
        if k % 10 == 9:
            items[3] = (3, corrupt, 512, 512)
        return decoder.decode_into(targets[k % lanes].address, height, width, 3, items)

    try:
        with ThreadPoolExecutor(lanes) as pool:
            assert list(pool.map(batch, range(100))) == [{3} if k % 10 == 9 else set() for k in range(100)]
            before = free_device_memory()
            decoded = n * len(list(pool.map(batch, range(100, 100 + 200_000 // n))))
        grown = (before - free_device_memory()) / (1 << 20)
        merged = decoder.largest_batch
    finally:
        decoder.close()
        for target in targets:
            target.free()
    print(f"GPU memory over {decoded} decodes at {len(sizes)} sizes: {grown:+.1f} MiB; up to {merged} decoded together")
    assert decoded >= 200_000 and grown < 16 and merged > n
