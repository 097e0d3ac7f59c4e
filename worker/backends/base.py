"""The backend interface: open/close, the bucket specs, ``infer(bucket, batch)``.

Backends know nothing of Redis or batching. Every backend enforces the same profile rules that
TensorRT does (shape inside the bucket's min..max, batch <= max), so the CPU path tests them too.
"""

from __future__ import annotations

import abc
import enum
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.buckets import BucketSpec, ModelSpec
from worker.errors import BackendError, ShapeOutOfProfileError
from worker.settings import BackendSettings

Tensor = npt.NDArray[np.float32]
Outputs = dict[str, npt.NDArray[Any]]


class State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class Backend(abc.ABC):
    """Template: public methods check the lifecycle and the profile, ``_*`` methods do the work."""

    kind = "abstract"

    def __init__(self, spec: ModelSpec, onnx_path: Path, settings: BackendSettings) -> None:
        self.spec = spec
        self.onnx_path = onnx_path
        self.settings = settings
        self._state = State.UNOPENED
        self._lock = threading.Lock()
        self.healthy = True

    @property
    def buckets(self) -> tuple[BucketSpec, ...]:
        return self.spec.buckets

    def open(self) -> None:
        with self._lock:
            if self._state is not State.UNOPENED:
                raise RuntimeError(f"backend is {self._state.value}; a backend opens once")
            self._open()
            self._state = State.OPEN

    def close(self) -> None:
        with self._lock:
            if self._state is State.OPEN:
                self._close()
            self._state = State.CLOSED

    def __enter__(self) -> Backend:
        self.open()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def instances(self, bucket_id: str) -> int:
        """How many batches of one bucket may run at the same time (one thread each)."""
        return 1

    def check_batch(self, bucket: BucketSpec, batch: Tensor) -> None:
        if batch.ndim != 4 or batch.shape[1] != self.spec.channels or batch.dtype != np.float32:
            raise ShapeOutOfProfileError(
                f"bucket {bucket.id}: expected float32 [N,{self.spec.channels},H,W], got {batch.dtype} {batch.shape}"
            )
        n, _, h, w = batch.shape
        if not bucket.contains(n, h, w):
            raise ShapeOutOfProfileError(
                f"bucket {bucket.id}: batch shape {n}x{h}x{w} (NxHxW) is outside its profile "
                f"{'x'.join(map(str, bucket.min))} .. {'x'.join(map(str, bucket.max))}"
            )

    def infer(self, bucket_id: str, batch: Tensor) -> Outputs:
        """Run one padded batch through the bucket's profile; outputs keep the batch's N first."""
        if self._state is not State.OPEN:
            raise BackendError(f"backend is {self._state.value}, not open")
        bucket = self.spec.bucket(bucket_id)
        self.check_batch(bucket, batch)
        outputs = self._infer(bucket, batch)
        for name, array in outputs.items():
            if array.shape[0] != batch.shape[0]:
                raise BackendError(f"output {name} has {array.shape[0]} rows for a batch of {batch.shape[0]}")
        return outputs

    def describe(self) -> dict[str, str]:
        """Labels for the backend_info metric and logs."""
        return {"kind": self.kind}

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, bucket: BucketSpec, batch: Tensor) -> Outputs: ...
