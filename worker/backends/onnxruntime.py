"""ONNX Runtime on the CPU: the default backend and the reference the GPU backend is checked against.

It runs the same engine graph TensorRT builds from (``worker.compute.graph``): uint8 pixels in, the
normalisation inside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort

from worker.backends.base import Backend, Compressed, HostLane, Lane, Outputs
from worker.compute.graph import ENGINE_INPUT, engine_graph
from worker.core.buckets import BucketSpec
from worker.core.errors import BackendError, EngineLoadError


class OnnxRuntimeLane(HostLane):
    def __init__(self, bucket: BucketSpec, backend: OnnxRuntimeBackend) -> None:
        super().__init__(bucket, backend.spec)
        self._session = backend.session

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        try:
            values = self._session.run(None, {ENGINE_INPUT: self._input(n, height, width)})
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise BackendError(f"onnxruntime failed on bucket {self.bucket.id}: {exc}") from exc
        return {o.name: v for o, v in zip(self._session.get_outputs(), values, strict=True)}


class OnnxRuntimeBackend(Backend):
    """One session shared by every bucket (ORT's ``run`` is thread-safe); one lane per bucket."""

    kind = "onnxruntime"
    session: ort.InferenceSession

    def _open(self) -> None:
        options = ort.SessionOptions()
        if self.settings.cpu_threads:
            options.intra_op_num_threads = self.settings.cpu_threads
        options.log_severity_level = 3
        graph = engine_graph(self.onnx_path, self.spec)
        try:
            self.session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped exceptions (Fail, InvalidGraph, ...)
            raise EngineLoadError(f"onnxruntime cannot load {self.onnx_path}: {exc}") from exc

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [OnnxRuntimeLane(bucket, self)]

    def _close(self) -> None:
        del self.session

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "version": ort.__version__, "device": "cpu"}
