"""The TensorRT backend on a real GPU with the real PP-OCRv4 detector, against ONNX Runtime."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from worker.buckets import BucketSpec, ModelSpec
from worker.errors import ShapeOutOfProfileError
from worker.settings import Settings

pytestmark = pytest.mark.gpu
#: TF32 off: TensorRT and ONNX Runtime differ only in float32 summation order and kernels
ATOL = 2e-4


@pytest.fixture(scope="module")
def reference(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def _shapes(bucket: BucketSpec, rng: np.random.Generator, count: int = 3) -> list[tuple[int, int, int, int]]:
    """The profile's min, opt and max, plus random shapes inside it (H, W multiples of 32)."""
    shapes = [(s[0], 3, s[1], s[2]) for s in (bucket.min, bucket.opt, bucket.max)]
    for _ in range(count):
        n = int(rng.integers(bucket.min[0], bucket.max[0] + 1))
        h = int(rng.integers(bucket.min[1] // 32, bucket.max[1] // 32 + 1)) * 32
        w = int(rng.integers(bucket.min[2] // 32, bucket.max[2] // 32 + 1)) * 32
        shapes.append((n, 3, h, w))
    return shapes


def test_parity_with_onnxruntime_on_every_bucket(
    trt_backend: Any, reference: ort.InferenceSession, small_spec: ModelSpec
) -> None:
    rng = np.random.default_rng(2026)
    worst = 0.0
    for bucket in small_spec.buckets:
        for shape in _shapes(bucket, rng):
            batch = rng.uniform(-1, 1, shape).astype(np.float32)  # fresh input; outputs poisoned with NaN
            got = trt_backend.infer(bucket.id, batch)[small_spec.output]
            (want,) = reference.run([small_spec.output], {small_spec.input: batch})
            assert got.shape == want.shape and np.isfinite(got).all(), (bucket.id, shape)
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            assert diff <= ATOL, (bucket.id, shape, diff)
    print(f"max |TensorRT - ONNX Runtime| over all shapes: {worst:.2e} (tolerance {ATOL:.0e})")


def test_buckets_running_concurrently_match_serial_runs(
    gpu_settings: Settings, small_spec: ModelSpec, onnx_path: Path
) -> None:
    """Two contexts per bucket, every context on its own thread and stream, all at once."""
    from worker.backends.tensorrt.backend import TensorRTBackend

    two_lanes = gpu_settings.backend.model_copy(
        update={"tensorrt": gpu_settings.backend.tensorrt.model_copy(update={"instances": 2})}
    )
    rng = np.random.default_rng(7)
    work = [
        (bucket.id, rng.uniform(-1, 1, (bucket.opt[0], 3, bucket.opt[1], bucket.opt[2])).astype(np.float32))
        for bucket in small_spec.buckets
        for _ in range(4)
    ]
    with TensorRTBackend(small_spec, onnx_path, two_lanes) as backend:
        serial = [backend.infer(bucket_id, batch)[small_spec.output] for bucket_id, batch in work]
        concurrent: list[Any] = [None] * len(work)
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                for _ in range(5):
                    concurrent[index] = backend.infer(work[index][0], work[index][1])[small_spec.output]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for got, want in zip(concurrent, serial, strict=True):
        np.testing.assert_array_equal(got, want)


def test_out_of_profile_shapes_are_rejected_not_run(trt_backend: Any, small_spec: ModelSpec) -> None:
    small = small_spec.buckets[0]
    too_big = np.zeros((1, 3, small.max[1] + 32, small.max[2]), np.float32)
    too_many = np.zeros((small.max[0] + 1, 3, 64, 64), np.float32)
    for batch in (too_big, too_many):
        with pytest.raises(ShapeOutOfProfileError, match="outside"):
            trt_backend.infer(small.id, batch)
        lane = trt_backend.lanes[small.id].get()  # the lane checks too: 8.6's set_input_shape would accept it
        try:
            with pytest.raises(ShapeOutOfProfileError, match="outside profile 0"):
                lane.run(batch)
        finally:
            trt_backend.lanes[small.id].put(lane)
    assert trt_backend.healthy


def test_plan_cache_hit_rebuild_on_changed_spec_and_on_corruption(
    trt_backend: Any, gpu_settings: Settings, small_spec: ModelSpec, onnx_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.backends.tensorrt.build import plan_for

    settings = gpu_settings.backend.tensorrt
    caplog.set_level("INFO")
    first = plan_for(small_spec, onnx_path, settings, trt_backend.device)
    stamp = first.stat().st_mtime_ns
    assert plan_for(small_spec, onnx_path, settings, trt_backend.device) == first
    assert first.stat().st_mtime_ns == stamp and "plan cache hit" in caplog.text

    tiny = small_spec.model_copy(
        update={"buckets": (BucketSpec(id="t64", min=(1, 32, 32), opt=(1, 64, 64), max=(2, 64, 64)),)}
    )
    rebuilt = plan_for(tiny, onnx_path, settings, trt_backend.device)
    assert rebuilt != first and rebuilt.is_file()

    data = bytearray(rebuilt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rebuilt.write_bytes(bytes(data))
    caplog.clear()
    again = plan_for(tiny, onnx_path, settings, trt_backend.device)
    assert again == rebuilt and "corrupt" in caplog.text and "plan written" in caplog.text
