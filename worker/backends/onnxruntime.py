"""ONNX Runtime on the CPU: the default backend and the reference the GPU backend is checked against."""

from __future__ import annotations

import onnxruntime as ort

from worker.backends.base import Backend, Outputs, Tensor
from worker.buckets import BucketSpec
from worker.errors import BackendError, EngineLoadError


class OnnxRuntimeBackend(Backend):
    """One session shared by all buckets (ORT's ``run`` is thread-safe); buckets only gate shapes."""

    kind = "onnxruntime"
    _session: ort.InferenceSession

    def _open(self) -> None:
        options = ort.SessionOptions()
        if self.settings.cpu_threads:
            options.intra_op_num_threads = self.settings.cpu_threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions (Fail, InvalidGraph, ...)
            raise EngineLoadError(f"onnxruntime cannot load {self.onnx_path}: {exc}") from exc
        names = [i.name for i in self._session.get_inputs()]
        if names != [self.spec.input]:
            raise EngineLoadError(f"model inputs are {names}, the spec expects [{self.spec.input!r}]")

    def _close(self) -> None:
        del self._session

    def _infer(self, bucket: BucketSpec, batch: Tensor) -> Outputs:
        try:
            values = self._session.run(None, {self.spec.input: batch})
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise BackendError(f"onnxruntime failed on bucket {bucket.id}: {exc}") from exc
        return {o.name: v for o, v in zip(self._session.get_outputs(), values, strict=True)}

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "version": ort.__version__, "device": "cpu"}
