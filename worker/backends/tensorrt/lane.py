"""One execution lane of a bucket: an execution context bound to the bucket's profile, its own CUDA
stream, device buffers and pinned host buffers sized for the profile's max shape, reused per batch.

The pipeline writes uint8 pixels straight into the pinned input buffer; a run copies only the
batch's bytes in and its outputs out, and waits on this lane's stream alone. A worker process's
shared-memory block, pinned by the engine server, is copied from and into directly instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from worker.backends.base import Compressed, HostBlock, Lane, Outputs, Pixels
from worker.backends.tensorrt import _compat
from worker.backends.tensorrt._cuda import (
    CudaError,
    Device,
    DeviceBuffer,
    PinnedBuffer,
    Stream,
    copy_to_device,
    copy_to_host,
    fill_u8,
)
from worker.backends.tensorrt._logger import trt_logger
from worker.backends.tensorrt.engine import TensorInfo, io_tensors
from worker.backends.tensorrt.jpeg_decoder import DeviceJpegDecoder
from worker.compute.graph import ENGINE_INPUT
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import BackendError, EngineLoadError, ShapeOutOfProfileError

#: where an output goes: its host address, given the output and its shape for this batch
Destination = Callable[[TensorInfo, tuple[int, ...]], int]


class TensorRTLane(Lane):
    def __init__(
        self,
        engine: Any,
        spec: ModelSpec,
        bucket: BucketSpec,
        *,
        profile: int,
        device: Device,
        on_sticky: Callable[[], None],
        nvimgcodec: Any = None,
    ) -> None:
        super().__init__(bucket, spec)
        self.profile = profile
        self.device = device
        self._on_sticky = on_sticky
        device.bind()
        self.context = _compat.create_context(engine)
        if self.context is None:
            raise EngineLoadError(f"cannot create an execution context for bucket {bucket.id} (out of GPU memory?)")
        self.stream = Stream()
        self._jpeg = (
            DeviceJpegDecoder(nvimgcodec, device, self.stream, spec.preprocess.pad_value()[0], bucket.max)
            if nvimgcodec
            else None
        )
        self.decodes_jpeg = self._jpeg is not None
        if not self.context.set_optimization_profile_async(profile, self.stream.address):
            raise EngineLoadError(f"cannot bind profile {profile} to a context of bucket {bucket.id}")
        self.stream.synchronize()
        tensors = io_tensors(engine)
        self.input_tensor = next(t for t in tensors if t.is_input)
        if self.input_tensor.name != ENGINE_INPUT or self.input_tensor.dtype != np.uint8:
            raise EngineLoadError(
                f"plan input is {self.input_tensor.name} {self.input_tensor.dtype}, expected {ENGINE_INPUT} uint8"
            )
        self.output_tensors = [t for t in tensors if not t.is_input]
        max_shape = spec.engine_input_shapes(bucket)[2]
        if not self.context.set_input_shape(self.input_tensor.name, max_shape):
            raise EngineLoadError(f"profile {profile} rejects its own max shape {max_shape}")
        sizes = {self.input_tensor.name: int(np.prod(max_shape))}
        for out in self.output_tensors:
            shape = tuple(self.context.get_tensor_shape(out.name))
            if min(shape) < 0:
                raise EngineLoadError(f"output {out.name} has a data-dependent shape {shape}; not supported")
            sizes[out.name] = int(np.prod(shape)) * out.dtype.itemsize
        self.device_buffers = {name: DeviceBuffer(n) for name, n in sizes.items()}
        self.host_buffers = {name: PinnedBuffer(n) for name, n in sizes.items()}
        for name, buffer in self.device_buffers.items():
            self.context.set_tensor_address(name, buffer.address)
        self._shape = max_shape

    def _input(self, n: int, height: int, width: int) -> Pixels:
        view: Pixels = self.host_buffers[self.input_tensor.name].view((n, height, width, self.spec.channels), np.uint8)
        return view

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        """Through the lane's own pinned buffers; the outputs are views of them."""
        views: Outputs = {}

        def own_buffer(out: TensorInfo, shape: tuple[int, ...]) -> int:
            views[out.name] = self.host_buffers[out.name].view(shape, out.dtype)
            return self.host_buffers[out.name].address

        self._copied_run(
            n, height, width, self.host_buffers[self.input_tensor.name].address, own_buffer, compressed=compressed
        )
        return views

    def run_block(
        self, block: HostBlock, n: int, height: int, width: int, compressed: Sequence[Compressed] = ()
    ) -> dict[str, tuple[int, ...]]:
        """A pinned block is copied from and into directly: no staging copy through the lane's buffers."""
        if not block.pinned:
            return super().run_block(block, n, height, width, compressed)
        self._check(n, height, width)
        shapes: dict[str, tuple[int, ...]] = {}

        def into_block(out: TensorInfo, shape: tuple[int, ...]) -> int:
            shapes[out.name] = shape
            return block.output_address(out.name, shape)

        self._copied_run(n, height, width, block.address, into_block, compressed=compressed)
        return shapes

    def _copied_run(
        self,
        n: int,
        height: int,
        width: int,
        source: int,
        destination: Destination,
        *,
        compressed: Sequence[Compressed],
    ) -> None:
        try:
            self._execute(n, height, width, (source, destination), compressed)
        except CudaError as exc:
            if exc.sticky:
                self._on_sticky()
            raise

    def _execute(
        self,
        n: int,
        height: int,
        width: int,
        copies: tuple[int, Destination] | None,
        compressed: Sequence[Compressed] = (),
    ) -> None:
        """Shape → H2D from the source address (the slots the CPU filled) → the device decodes
        its JPEGs into theirs → execute_async_v3 → D2H to each output's destination, then wait
        on this lane's stream only. Without ``copies``: execution alone."""
        self.device.bind()
        shape = (n, height, width, self.spec.channels)
        # TensorRT 8.6's set_input_shape accepts shapes outside the profile: Lane.run checked it first.
        if shape != self._shape:
            if not self.context.set_input_shape(self.input_tensor.name, shape):
                raise ShapeOutOfProfileError(f"TensorRT rejected shape {shape} on profile {self.profile}")
            self._shape = shape
        input_buffer = self.device_buffers[self.input_tensor.name]
        if copies and len(compressed) < n:
            copy_to_device(input_buffer, copies[0], int(np.prod(shape)), self.stream)
            if compressed:
                self.stream.synchronize()  # idle before a hardware decode, and the decodes land after the copy
        self.undecodable = set()
        if compressed and self._jpeg is not None:
            self.undecodable = self._jpeg.decode_into(
                input_buffer.address, height, width, self.spec.channels, compressed
            )
        if not self.context.execute_async_v3(self.stream.address):
            self.stream.synchronize()
            raise BackendError(f"execute_async_v3 failed on bucket {self.bucket.id}: {trt_logger().last_error}")
        if copies:
            _, destination = copies
            for out in self.output_tensors:
                out_shape = tuple(self.context.get_tensor_shape(out.name))
                nbytes = int(np.prod(out_shape)) * out.dtype.itemsize
                copy_to_host(destination(out, out_shape), self.device_buffers[out.name], nbytes, self.stream)
        self.stream.synchronize()

    def time_execute(self, n: int, height: int, width: int) -> float:
        """Benchmarks only: GPU milliseconds of one execution (CUDA events), no copies."""
        self.device.bind()
        self.stream.record(0)
        self._execute(n, height, width, None)
        self.stream.record(1)
        self.stream.synchronize()
        return self.stream.elapsed_ms()

    def poison_outputs(self, byte: int) -> None:
        """Tests only: fill the device outputs with one byte value, to prove a run overwrites them all."""
        self.device.bind()
        for out in self.output_tensors:
            buffer = self.device_buffers[out.name]
            fill_u8(buffer, byte, buffer.nbytes, self.stream)
        self.stream.synchronize()

    def close(self) -> None:
        self.device.bind()
        self.stream.synchronize()
        self._jpeg = None  # its images free their memory on this stream: before the stream goes
        for buffer in self.device_buffers.values():
            buffer.free()
        for pinned in self.host_buffers.values():
            pinned.free()
        self.stream.destroy()
        del self.context
