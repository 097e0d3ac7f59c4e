"""The backend interface: open/close, and per bucket a few lanes that each run one batch at a time.

Backends know nothing of Redis or batching. A lane owns an input buffer sized for its profile's
max batch (pinned host memory on the GPU): the pipeline writes uint8 pixels straight into it, runs
it, and reads the outputs, which stay valid until the lane's next run. Every backend enforces the
same profile rules TensorRT does (shape inside the bucket's min..max), so the CPU path tests them.
"""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import BackendError, InternalError, ShapeOutOfProfileError
from worker.core.settings import BackendSettings

Outputs = dict[str, npt.NDArray[Any]]
Pixels = npt.NDArray[np.uint8]
#: a batch slot the device decodes: (slot, the JPEG's bytes, its height, its width)
Compressed = tuple[int, bytes | memoryview, int, int]


class State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class HostBlock:
    """Host memory another process fills and reads (a worker's shared-memory block): the batch's
    pixels first, then each output at its offset. A backend may pin it (``Backend.pin``), so the
    device copies to and from it directly instead of through the lane's own buffers."""

    def __init__(self, buffer: memoryview, channels: int, outputs: dict[str, tuple[np.dtype[Any], int, int]]) -> None:
        self.buffer = buffer
        self.channels = channels
        #: per output: dtype, byte offset, capacity in bytes
        self.outputs = outputs
        self.address = np.frombuffer(buffer, np.uint8).ctypes.data
        self.pinned = False

    def pixels(self, n: int, height: int, width: int) -> Pixels:
        return np.ndarray((n, height, width, self.channels), np.uint8, buffer=self.buffer)

    def output(self, name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        return np.ndarray(shape, self.outputs[name][0], buffer=self.buffer, offset=self._offset(name, shape))

    def output_address(self, name: str, shape: tuple[int, ...]) -> int:
        return self.address + self._offset(name, shape)

    def _offset(self, name: str, shape: tuple[int, ...]) -> int:
        dtype, offset, capacity = self.outputs[name]
        if int(np.prod(shape)) * dtype.itemsize > capacity:
            raise InternalError(f"output {name} {shape} does not fit its {capacity} bytes")
        return offset


class Lane(abc.ABC):
    """One execution slot of one bucket; the caller uses a lane from one thread at a time."""

    #: whether ``run`` takes JPEGs for the device to decode
    decodes_jpeg = False

    def __init__(self, bucket: BucketSpec, spec: ModelSpec) -> None:
        self.bucket = bucket
        self.spec = spec
        #: slots of the last run whose JPEG the device could not decode
        self.undecodable: set[int] = set()
        #: seconds of each step of the last run, where the backend times them (``engine_step_seconds``)
        self.timings: dict[str, float] = {}

    def _check(self, n: int, height: int, width: int) -> None:
        if not self.bucket.contains(n, height, width):
            raise ShapeOutOfProfileError(
                f"bucket {self.bucket.id}: batch shape {n}x{height}x{width} (NxHxW) is outside its profile "
                f"{'x'.join(map(str, self.bucket.min))} .. {'x'.join(map(str, self.bucket.max))}"
            )

    def input(self, n: int, height: int, width: int) -> Pixels:
        """A writable [n, height, width, 3] view of the lane's input buffer."""
        self._check(n, height, width)
        return self._input(n, height, width)

    def run(self, n: int, height: int, width: int, compressed: Sequence[Compressed] = ()) -> Outputs:
        """Run the batch written into ``input(n, height, width)``; outputs are valid until the next run.

        ``compressed``: slots whose JPEG the device decodes into the batch (lanes of a backend
        with ``decodes_jpeg``); those it could not decode are in ``undecodable`` after the run,
        their outputs meaningless, the other slots' unaffected."""
        self._check(n, height, width)
        if compressed and not self.decodes_jpeg:
            raise InternalError(f"{type(self).__name__} cannot decode JPEGs on a device")
        outputs = self._run(n, height, width, compressed)
        for name, array in outputs.items():
            if array.shape[0] != n:
                raise InternalError(f"output {name} has {array.shape[0]} rows for a batch of {n}")
        return outputs

    def run_block(
        self, block: HostBlock, n: int, height: int, width: int, compressed: Sequence[Compressed] = ()
    ) -> dict[str, tuple[int, ...]]:
        """Run the batch whose pixels are in ``block``, its outputs written back into it; their shapes."""
        self.input(n, height, width)[:] = block.pixels(n, height, width)
        shapes = {}
        for name, array in self.run(n, height, width, compressed).items():
            block.output(name, array.shape)[:] = array
            shapes[name] = array.shape
        return shapes

    @abc.abstractmethod
    def _input(self, n: int, height: int, width: int) -> Pixels: ...

    @abc.abstractmethod
    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs: ...

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Free what the lane holds (device and pinned memory)."""


class HostLane(Lane):
    """A lane whose input is ordinary host memory (CPU backends)."""

    def __init__(self, bucket: BucketSpec, spec: ModelSpec) -> None:
        super().__init__(bucket, spec)
        n, h, w = bucket.max
        self._buffer = np.empty(n * h * w * spec.channels, np.uint8)

    def _input(self, n: int, height: int, width: int) -> Pixels:
        return self._buffer[: n * height * width * self.spec.channels].reshape(n, height, width, self.spec.channels)


class Backend(abc.ABC):
    """Template: public methods check the lifecycle, ``_*`` methods do the work."""

    kind = "abstract"

    def __init__(self, spec: ModelSpec, onnx_path: Path, settings: BackendSettings) -> None:
        self.spec = spec
        self.onnx_path = onnx_path
        self.settings = settings
        self._state = State.UNOPENED
        self._lock = threading.Lock()
        self._lanes: dict[str, list[Lane]] = {}
        #: False once a failure left the device unusable (a sticky CUDA error): the worker must restart
        self.healthy = True

    def open(self) -> None:
        with self._lock:
            if self._state is not State.UNOPENED:
                raise RuntimeError(f"backend is {self._state.value}; a backend opens once")
            self._open()
            self._lanes = {bucket.id: self._make_lanes(bucket, index) for index, bucket in enumerate(self.spec.buckets)}
            self._state = State.OPEN

    def close(self) -> None:
        """Free everything; the caller makes sure no lane is running."""
        with self._lock:
            if self._state is State.OPEN:
                for lanes in self._lanes.values():
                    for lane in lanes:
                        lane.close()
                self._close()
            self._state = State.CLOSED

    def __enter__(self) -> Backend:
        self.open()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def lanes(self, bucket_id: str) -> list[Lane]:
        if self._state is not State.OPEN:
            raise BackendError(f"backend is {self._state.value}, not open")
        return self._lanes[bucket_id]

    def describe(self) -> dict[str, str]:
        """Labels for the build-info metric and logs."""
        return {"kind": self.kind}

    @property
    def jpeg_decode(self) -> str:
        """What decodes the JPEGs its lanes take compressed: ``gpu_hw`` (the device's JPEG engines),
        ``gpu_cuda`` (CUDA kernels), or ``cpu`` when they take none (the pipeline decodes them)."""
        return "cpu"

    @property
    def decodes_jpeg(self) -> bool:
        """Whether its lanes take JPEGs (at their input size) for the device to decode."""
        return self.jpeg_decode != "cpu"

    def pin(self, block: HostBlock) -> None:  # noqa: B027 - only device backends copy from host memory
        """Make ``block`` directly usable by the device, where the backend can (sets ``block.pinned``)."""

    def unpin(self, block: HostBlock) -> None:  # noqa: B027
        """Undo ``pin`` before the block's memory goes away."""

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]: ...

    def _close(self) -> None:  # noqa: B027 - an optional hook
        """Free what ``_open`` made, after every lane is closed."""
