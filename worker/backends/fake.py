"""The ``fake`` backend: no model, for benchmarks and pipeline tests.

Every image gets one real probability map, recorded once from the real model on a real photo and
resized to the batch's shape, after a configurable delay per batch and per image. It measures what
the pipeline around the engine costs, and drives tests that need a fast, deterministic backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from worker.backends.base import Backend, Compressed, HostLane, Lane, Outputs
from worker.compute.graph import engine_output
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import EngineLoadError


def recorded_map_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(f"{onnx_path.stem}.probability.png")


def record_probability_map(spec: ModelSpec, onnx_path: Path, photo: bytes) -> Path:
    """Run the real model (ONNX Runtime) on a real photo once and keep its map as a uint8 PNG."""
    from worker.backends.onnxruntime import OnnxRuntimeBackend
    from worker.compute.imaging import ByteBudget, Limits, prepare
    from worker.core.settings import BackendSettings

    uint8_spec = spec.model_copy(update={"engine_output": "uint8"})
    prepared = prepare(photo, uint8_spec, Limits(40_000_000, 1 << 30), ByteBudget(1 << 30))
    h, w = prepared.height, prepared.width
    bucket = BucketSpec(id="record", min=(1, h, w), opt=(1, h, w), max=(1, h, w))
    with OnnxRuntimeBackend(uint8_spec.model_copy(update={"buckets": (bucket,)}), onnx_path, BackendSettings()) as ort:
        (lane,) = ort.lanes("record")
        lane.input(1, h, w)[0] = prepared.pixels
        prob = lane.run(1, h, w)[engine_output(uint8_spec)][0, 0]
    path = recorded_map_path(onnx_path)
    if not cv2.imwrite(str(path), prob):
        raise OSError(f"cannot write {path}")
    return path


class FakeLane(HostLane):
    def __init__(self, bucket: BucketSpec, backend: FakeBackend) -> None:
        super().__init__(bucket, backend.spec)
        self._backend = backend

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        fake = self._backend.settings.fake
        started = time.perf_counter()
        time.sleep((fake.batch_ms + n * fake.image_ms) / 1000)
        self.timings = {"execute": time.perf_counter() - started}
        prob = self._backend.map_at(height, width)
        return {self._backend.output: np.broadcast_to(prob, (n, 1, height, width))}


class FakeBackend(Backend):
    kind = "fake"

    def _open(self) -> None:
        path = recorded_map_path(self.onnx_path)
        recorded = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if recorded is None:
            raise EngineLoadError(f"no recorded probability map at {path}; run `python -m worker fetch-assets`")
        self._recorded = np.asarray(recorded, np.uint8)
        self.output = engine_output(self.spec)
        self._maps: dict[tuple[int, int], npt.NDArray[np.generic]] = {}
        self._maps_lock = threading.Lock()

    def map_at(self, height: int, width: int) -> npt.NDArray[np.generic]:
        """The recorded map resized to one batch shape, computed once per shape."""
        with self._maps_lock:
            prob = self._maps.get((height, width))
            if prob is None:
                resized = cv2.resize(self._recorded, (width, height), interpolation=cv2.INTER_LINEAR)
                prob = resized if self.spec.engine_output == "uint8" else resized.astype(np.float32) / 255
                self._maps[(height, width)] = prob
        return prob

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [FakeLane(bucket, self) for _ in range(self.settings.fake.lanes)]

    def describe(self) -> dict[str, str]:
        fake = self.settings.fake
        return {"kind": self.kind, "device": "none", "cost": f"{fake.batch_ms} ms/batch + {fake.image_ms} ms/image"}
