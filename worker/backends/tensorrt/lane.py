"""One lane of a bucket: a CUDA stream of its own and device buffers for the profile's max shape
(pinned host buffers too, once it is used in this process), reused batch after batch.

A run copies the batch's pixels in on the lane's stream and has the device's JPEG decoder decode its
JPEGs into their slots, then borrows one of the bucket's execution contexts (``contexts``) only to
execute: contexts never wait on a copy or a decode. The pipeline writes uint8 pixels straight into
the pinned input buffer; a worker process's shared-memory block, pinned by the engine server, is
copied from and into directly instead. A run waits on this lane's stream alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from worker.backends.base import Compressed, HostBlock, Lane, Outputs, Pixels
from worker.backends.tensorrt._cuda import (
    CudaError,
    Device,
    DeviceBuffer,
    Event,
    PinnedBuffer,
    Stream,
    copy_to_device,
    copy_to_host,
    fill_u8,
)
from worker.backends.tensorrt._logger import trt_logger
from worker.backends.tensorrt.contexts import BucketContexts
from worker.backends.tensorrt.engine import TensorInfo
from worker.backends.tensorrt.jpeg_decoder import DeviceJpegDecoder
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import BackendError

#: where an output goes: its host address, given the output and its shape for this batch
Destination = Callable[[TensorInfo, tuple[int, ...]], int]


class TensorRTLane(Lane):
    def __init__(
        self,
        contexts: BucketContexts,
        spec: ModelSpec,
        bucket: BucketSpec,
        *,
        device: Device,
        on_sticky: Callable[[], None],
        jpeg_decoder: DeviceJpegDecoder | None = None,
    ) -> None:
        super().__init__(bucket, spec)
        self.contexts = contexts
        self.device = device
        self._on_sticky = on_sticky
        device.bind()
        self.stream = Stream()
        #: reached once the engine has run: the context goes back before the outputs' copies end
        self._executed = Event()
        #: the device's decoder, shared by every lane
        self._jpeg = jpeg_decoder
        self.decodes_jpeg = self._jpeg is not None
        self.input_tensor = contexts.input_tensor
        self.output_tensors = contexts.output_tensors
        self.device_buffers = {name: DeviceBuffer(n) for name, n in contexts.sizes.items()}
        self._addresses = {name: buffer.address for name, buffer in self.device_buffers.items()}
        #: allocated on first use: an engine server's lanes copy from and into workers' memory instead
        self._host_buffers: dict[str, PinnedBuffer] = {}

    @property
    def host_buffers(self) -> dict[str, PinnedBuffer]:
        if not self._host_buffers:
            self.device.bind()
            self._host_buffers = {name: PinnedBuffer(n) for name, n in self.contexts.sizes.items()}
        return self._host_buffers

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
        """H2D from the source address (the slots the CPU filled) → the device decodes its JPEGs into
        theirs → wait for both → borrow a context: execute_async_v3 → D2H to each output's
        destination → give the context back once executed, wait for the copies. Without
        ``copies``: execution alone. Each step's seconds go to ``timings``."""
        self.device.bind()
        started = time.perf_counter()
        shape = (n, height, width, self.spec.channels)
        input_buffer = self.device_buffers[self.input_tensor.name]
        self.undecodable = set()
        if copies and len(compressed) < n:
            copy_to_device(input_buffer, copies[0], int(np.prod(shape)), self.stream)
        # the copy has landed before the decodes write over its slots and before a context is taken;
        # the decoder returns once its images are in place
        self.stream.synchronize()
        if compressed and self._jpeg is not None:
            self.undecodable = self._jpeg.decode_into(
                input_buffer.address, height, width, self.spec.channels, compressed
            )
        ready = time.perf_counter()
        with self.contexts.borrow() as context:
            borrowed = time.perf_counter()
            try:
                context.prepare(self.input_tensor.name, shape, self._addresses, self.contexts.profile)
                if not context.trt.execute_async_v3(self.stream.address):
                    raise BackendError(f"execute_async_v3 failed on bucket {self.bucket.id}: {trt_logger().last_error}")
                self._executed.record(self.stream)
                if copies:
                    _, destination = copies
                    for out in self.output_tensors:
                        out_shape = tuple(context.trt.get_tensor_shape(out.name))
                        nbytes = int(np.prod(out_shape)) * out.dtype.itemsize
                        copy_to_host(destination(out, out_shape), self.device_buffers[out.name], nbytes, self.stream)
                self._executed.synchronize()
            except BaseException:
                with contextlib.suppress(CudaError):  # the context goes back idle, whatever failed
                    self.stream.synchronize()
                raise
        executed = time.perf_counter()
        self.stream.synchronize()
        self.timings = {
            "inputs": ready - started,
            "context_wait": borrowed - ready,
            "execute": executed - borrowed,
            "outputs": time.perf_counter() - executed,
        }

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
        for buffer in self.device_buffers.values():
            buffer.free()
        for pinned in self._host_buffers.values():
            pinned.free()
        self._executed.destroy()
        self.stream.destroy()
