"""A backend that fails on purpose, plugged in through ``backend.kind = "module:Class"``.

It runs the real ONNX Runtime backend but refuses any batch holding an image whose top-left corner
is the solid POISON_BGR colour, so the tests can send one job that fails on every delivery while
the rest of the pipeline (and every real photo) is untouched.
"""

from __future__ import annotations

import numpy as np

from worker.backends.base import Outputs, Tensor
from worker.backends.onnxruntime import OnnxRuntimeBackend
from worker.buckets import BucketSpec
from worker.errors import BackendError

POISON_BGR = (90, 17, 201)


class PoisonColourBackend(OnnxRuntimeBackend):
    kind = "poison-colour"

    def _infer(self, bucket: BucketSpec, batch: Tensor) -> Outputs:
        pre = self.spec.preprocess
        poison = np.array([(v * pre.scale - m) / s for v, m, s in zip(POISON_BGR, pre.mean, pre.std, strict=True)])
        corners = batch[:, :, :4, :4].reshape(len(batch), 3, -1)
        if np.any(np.all(np.abs(corners - poison[None, :, None]) < 1e-6, axis=(1, 2))):
            raise BackendError(f"refusing a batch of shape {batch.shape}: it holds the test poison")
        return super()._infer(bucket, batch)
