"""The TensorRT backend on a real GPU with the real PP-OCRv4 detector, against ONNX Runtime."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.backends.onnxruntime import OnnxRuntimeBackend
from worker.backends.remote import EngineServer, RemoteBackend
from worker.compute.graph import engine_output
from worker.compute.imaging import ByteBudget, Limits, assemble, prepare
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import ShapeOutOfProfileError
from worker.core.settings import BackendSettings, Settings

pytestmark = pytest.mark.gpu
#: TF32 off: TensorRT and ONNX Runtime differ only in float32 summation order and kernels, so a
#: map pixel (x255, rounded) may land one step apart; more than that is a real difference
MAX_STEP = 2
MAX_SHARE_OFF_BY_ONE = 0.01


def _batches(spec: ModelSpec, photos: list[Path]) -> list[tuple[BucketSpec, np.ndarray]]:
    """Real photos, grouped by bucket and padded shape into batches of up to 5 (the worker's way)."""
    limits = Limits(40_000_000, 1 << 30)
    groups: dict[tuple[str, int, int], list[np.ndarray]] = {}
    buckets = {b.id: b for b in spec.buckets}
    for photo in photos:
        p = prepare(photo.read_bytes(), spec, limits, ByteBudget(1 << 30))
        groups.setdefault((p.bucket.id, p.padded_height, p.padded_width), []).append(p.image)
    out = []
    for (bucket_id, h, w), images in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:6]:
        batch = np.empty((min(len(images), 5), h, w, 3), np.uint8)
        assemble(batch, images[: len(batch)], spec.preprocess.pad_value())
        out.append((buckets[bucket_id], batch))
    assert {b.id for b, _ in out} == set(buckets), "the photos must reach every bucket"
    return out


def _run(lane: Any, batch: np.ndarray, output: str) -> np.ndarray:
    n, h, w, _ = batch.shape
    lane.input(n, h, w)[:] = batch
    return np.array(lane.run(n, h, w)[output])


def test_parity_with_onnxruntime_on_real_photos(
    trt_backend: Any, small_spec: ModelSpec, onnx_path: Path, photos: list[Path]
) -> None:
    output = engine_output(small_spec)
    worst, off = 0, []
    with OnnxRuntimeBackend(small_spec, onnx_path, BackendSettings()) as reference:
        for bucket, batch in _batches(small_spec, photos):
            got = _run(trt_backend.lanes(bucket.id)[0], batch, output)
            want = _run(reference.lanes(bucket.id)[0], batch, output)
            assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, bucket.id
            diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
            worst = max(worst, int(diff.max()))
            off.append(float((diff > 0).mean()))
    print(f"TensorRT vs ONNX Runtime on real photos: max step {worst}, share of pixels off {max(off):.2e}")
    assert worst <= MAX_STEP and max(off) <= MAX_SHARE_OFF_BY_ONE


def test_every_output_element_is_written(trt_backend: Any, small_spec: ModelSpec, photos: list[Path]) -> None:
    """Two runs over device outputs poisoned with different bytes agree: nothing is left unwritten."""
    output = engine_output(small_spec)
    bucket, batch = _batches(small_spec, photos)[0]
    lane = trt_backend.lanes(bucket.id)[0]
    lane.poison_outputs(0x00)
    first = _run(lane, batch, output)
    lane.poison_outputs(0xFF)
    np.testing.assert_array_equal(_run(lane, batch, output), first)


def test_lanes_running_concurrently_match_serial_runs(
    trt_backend: Any, small_spec: ModelSpec, photos: list[Path]
) -> None:
    """Every lane of every bucket on its own thread and stream, all at once, bit for bit: lanes take
    turns on their bucket's contexts (twice as many lanes), each pointing a context at its own tensors."""
    output = engine_output(small_spec)
    work = _batches(small_spec, photos)
    serial = [_run(trt_backend.lanes(bucket.id)[0], batch, output) for bucket, batch in work]
    mismatches: list[str] = []
    errors: list[BaseException] = []

    def run(lane: Any, bucket_id: str) -> None:
        try:
            for _ in range(5):
                for i, (bucket, batch) in enumerate(work):
                    if bucket.id == bucket_id and not np.array_equal(_run(lane, batch, output), serial[i]):
                        mismatches.append(f"{bucket_id} batch {i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(lane, bucket.id))
        for bucket in small_spec.buckets
        for lane in trt_backend.lanes(bucket.id)
    ]
    for bucket in small_spec.buckets:  # two contexts and four lanes per bucket by default
        lanes = trt_backend.lanes(bucket.id)
        assert len(lanes) == 2 * len(lanes[0].contexts) >= 4
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not mismatches, (errors, mismatches)


def test_engine_server_copies_straight_from_and_into_pinned_worker_memory(
    trt_backend: Any, small_spec: ModelSpec, onnx_path: Path, photos: list[Path], tmp_path: Path
) -> None:
    """A worker's shared memory, pinned by the server, gives the very maps the lane's own buffers do."""
    output = engine_output(small_spec)
    server = EngineServer(trt_backend, small_spec, tmp_path / "engine.sock")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote_settings = {"address": str(tmp_path / "engine.sock"), "connect_timeout_s": 30}
    settings = BackendSettings(kind="remote", remote=remote_settings)
    try:
        with RemoteBackend(small_spec, onnx_path, settings) as remote:
            for bucket, batch in _batches(small_spec, photos):
                lane = remote.lanes(bucket.id)[0]
                assert lane.pinned, "the server could not pin the worker's shared memory"
                np.testing.assert_array_equal(
                    _run(lane, batch, output), _run(trt_backend.lanes(bucket.id)[0], batch, output)
                )
    finally:
        server.close()
    deadline = time.monotonic() + 10
    while server.attached and time.monotonic() < deadline:  # detached lanes unpin their memory
        time.sleep(0.05)
    assert server.attached == 0 and trt_backend.healthy


def test_out_of_profile_shapes_are_refused_before_tensorrt(trt_backend: Any, small_spec: ModelSpec) -> None:
    """TensorRT 8.6's set_input_shape accepts shapes outside the profile: the lane checks first."""
    small = small_spec.buckets[0]
    lane = trt_backend.lanes(small.id)[0]
    for n, h, w in [(1, small.max[1] + 32, small.max[2]), (small.max[0] + 1, 64, 64)]:
        with pytest.raises(ShapeOutOfProfileError, match="outside its profile"):
            lane.input(n, h, w)
        with pytest.raises(ShapeOutOfProfileError, match="outside its profile"):
            lane.run(n, h, w)
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
    settings = settings.model_copy(update={"optimization_level": 0})  # the quickest build: only the cache is tested
    rebuilt = plan_for(tiny, onnx_path, settings, trt_backend.device)
    assert rebuilt != first and rebuilt.is_file()

    data = bytearray(rebuilt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rebuilt.write_bytes(bytes(data))
    caplog.clear()
    again = plan_for(tiny, onnx_path, settings, trt_backend.device)
    assert again == rebuilt and "corrupt" in caplog.text and "plan written" in caplog.text
