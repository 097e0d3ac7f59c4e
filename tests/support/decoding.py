"""A CPU stand-in for a device that decodes JPEGs: ONNX Runtime whose lanes decode the JPEGs they
are handed into their slots with OpenCV (what the CPU path uses), so the route a compressed JPEG
takes (admission, batching, the engine server's shared memory, failed slots) is tested without a
GPU, and its results can be compared with the CPU path's pixel for pixel."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from worker.backends.base import Compressed, Lane, Outputs
from worker.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeLane
from worker.core.buckets import BucketSpec


class _DecodingLane(OnnxRuntimeLane):
    decodes_jpeg = True

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        pixels = self._input(n, height, width)
        self.undecodable = set()
        for slot, data, h, w in compressed:
            pixels[slot] = self.spec.preprocess.pad_value()
            image = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
            if image is None or image.shape[:2] != (h, w):
                self.undecodable.add(slot)
                continue
            pixels[slot, :h, :w] = image
        return super()._run(n, height, width, ())


class DecodingOrtBackend(OnnxRuntimeBackend):
    kind = "decoding-ort"

    @property
    def jpeg_decode(self) -> str:
        return "gpu_hw"

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "jpeg_decode": self.jpeg_decode}

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [_DecodingLane(bucket, self)]
