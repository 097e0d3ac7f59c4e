"""Backends that fail on purpose, plugged in through ``backend.kind = "module:Class"`` or directly.

Each wraps a real backend (ONNX Runtime or the fake one) and misbehaves only for batches holding an
image whose top-left corner is the solid POISON_BGR colour, so a test can send one bad job while
the rest of the pipeline, and every real photo, is untouched.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence

import numpy as np

from worker.backends.base import Compressed, Lane, Outputs
from worker.backends.fake import FakeBackend, FakeLane
from worker.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeLane
from worker.core.buckets import BucketSpec
from worker.core.errors import BackendError

POISON_BGR = (90, 17, 201)


def holds_poison(pixels: np.ndarray) -> bool:
    """True when some image of the batch starts with a 4x4 block of POISON_BGR."""
    corners = pixels[:, :4, :4, :].reshape(len(pixels), -1, 3)
    return bool(np.any(np.all(corners == np.array(POISON_BGR, np.uint8), axis=(1, 2))))


class _PoisonOrtLane(OnnxRuntimeLane):
    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        if holds_poison(self._input(n, height, width)):
            raise BackendError(f"refusing a batch of {n}x{height}x{width}: it holds the test poison")
        return super()._run(n, height, width, compressed)


class PoisonColourBackend(OnnxRuntimeBackend):
    """ONNX Runtime, refusing (BackendError, transient) every batch that holds the poison."""

    kind = "poison-colour"

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [_PoisonOrtLane(bucket, self)]


class _FaultyFakeLane(FakeLane):
    def __init__(self, bucket: BucketSpec, backend: FaultyFakeBackend) -> None:
        super().__init__(bucket, backend)
        self._faulty = backend

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        if holds_poison(self._input(n, height, width)):
            mode = self._faulty.mode
            if mode == "bug":
                raise ZeroDivisionError("a bug in the backend")
            if mode == "sticky":
                self._faulty.healthy = False
                raise BackendError("the device is lost")
            if mode == "hang":
                self._faulty.release.wait()
            if mode == "transient":
                raise BackendError("a transient failure")
        return super()._run(n, height, width, compressed)


class FaultyFakeBackend(FakeBackend):
    """The fake backend; a poisoned batch raises a bug, loses the device, fails, or hangs (``mode``)."""

    kind = "faulty-fake"
    mode = "bug"

    def _open(self) -> None:
        super()._open()
        self.release = threading.Event()

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [_FaultyFakeLane(bucket, self) for _ in range(self.settings.fake.lanes)]


class _CrashingLane(FakeLane):
    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        if holds_poison(self._input(n, height, width)):
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfault in a decoder or driver would
        return super()._run(n, height, width, compressed)


class CrashingFakeBackend(FakeBackend):
    """The fake backend, killing its whole process when a batch holds the poison."""

    kind = "crashing-fake"

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [_CrashingLane(bucket, self) for _ in range(self.settings.fake.lanes)]


class TransientFakeBackend(FaultyFakeBackend):
    """The fake backend; a poisoned batch fails transiently, every time (until it is dead-lettered)."""

    kind = "transient-fake"
    mode = "transient"
