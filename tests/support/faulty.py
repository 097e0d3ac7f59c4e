"""A backend that fails on purpose, plugged in through ``backend.kind = "module:Class"``.

It runs the real ONNX Runtime backend but refuses any batch padded to exactly POISON_HW, so the
tests can send one job that fails on every delivery while the rest of the pipeline is untouched.
"""

from __future__ import annotations

from worker.backends.base import Outputs, Tensor
from worker.backends.onnxruntime import OnnxRuntimeBackend
from worker.buckets import BucketSpec
from worker.errors import BackendError

POISON_HW = (96, 64)


class PoisonShapeBackend(OnnxRuntimeBackend):
    kind = "poison-shape"

    def _infer(self, bucket: BucketSpec, batch: Tensor) -> Outputs:
        if tuple(batch.shape[2:]) == POISON_HW:
            raise BackendError(f"refusing a batch of shape {batch.shape} (test poison)")
        return super()._infer(bucket, batch)
