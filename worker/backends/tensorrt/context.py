"""One bucket's execution lane: an execution context bound to the bucket's profile, its own CUDA
stream, and device plus pinned host buffers sized for the profile's max shape, reused per batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.backends.base import Outputs, Tensor
from worker.backends.tensorrt import _compat
from worker.backends.tensorrt._cuda import (
    Device,
    DeviceBuffer,
    PinnedBuffer,
    Stream,
    copy_to_device,
    copy_to_host,
    fill_u32,
)
from worker.backends.tensorrt._logger import trt_logger
from worker.backends.tensorrt.engine import io_tensors
from worker.buckets import BucketSpec, ModelSpec
from worker.errors import BackendError, EngineLoadError, ShapeOutOfProfileError

NAN_BITS = 0x7FC00000  # a float32 quiet NaN, written over outputs when poisoning is on


class BucketContext:
    def __init__(self, engine: Any, spec: ModelSpec, bucket: BucketSpec, profile: int, device: Device) -> None:
        self.spec = spec
        self.bucket = bucket
        self.profile = profile
        self.device = device
        self.last_gpu_ms = 0.0
        device.bind()
        self.context = _compat.create_context(engine)
        if self.context is None:
            raise EngineLoadError(f"cannot create an execution context for bucket {bucket.id} (out of GPU memory?)")
        self.stream = Stream()
        if not self.context.set_optimization_profile_async(profile, self.stream.address):
            raise EngineLoadError(f"cannot bind profile {profile} to the context of bucket {bucket.id}")
        self.stream.synchronize()
        tensors = io_tensors(engine)
        self.input = next(t for t in tensors if t.is_input)
        self.outputs = [t for t in tensors if not t.is_input]
        max_shape = spec.input_shapes(bucket)[2]
        if not self.context.set_input_shape(self.input.name, max_shape):
            raise EngineLoadError(f"profile {profile} rejects its own max shape {max_shape}")
        sizes = {self.input.name: int(np.prod(max_shape)) * self.input.dtype.itemsize}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out.name))
            if min(shape) < 0:
                raise EngineLoadError(f"output {out.name} has a data-dependent shape {shape}; not supported")
            sizes[out.name] = int(np.prod(shape)) * out.dtype.itemsize
        self.device_buffers = {name: DeviceBuffer(n) for name, n in sizes.items()}
        self.host_buffers = {name: PinnedBuffer(n) for name, n in sizes.items()}

    def run(self, batch: Tensor, poison_outputs: bool = False) -> Outputs:
        """Shape → addresses → H2D → execute_async_v3 → D2H, then wait on this bucket's stream only."""
        self.device.bind()
        n, _, h, w = batch.shape
        # TensorRT 8.6's set_input_shape accepts shapes outside the profile; check it here first.
        if not self.bucket.contains(n, h, w) or batch.shape[1] != self.spec.channels:
            raise ShapeOutOfProfileError(
                f"bucket {self.bucket.id}: shape {batch.shape} is outside profile {self.profile}"
            )
        if not self.context.set_input_shape(self.input.name, batch.shape):
            raise ShapeOutOfProfileError(f"TensorRT rejected shape {batch.shape} on profile {self.profile}")
        host_in = self.host_buffers[self.input.name].view(batch.shape, self.input.dtype)
        np.copyto(host_in, batch, casting="same_kind")
        copy_to_device(
            self.device_buffers[self.input.name], self.host_buffers[self.input.name], host_in.nbytes, self.stream
        )
        shapes: dict[str, tuple[int, ...]] = {}
        for tensor in [self.input, *self.outputs]:
            self.context.set_tensor_address(tensor.name, self.device_buffers[tensor.name].address)
        for out in self.outputs:
            shapes[out.name] = tuple(self.context.get_tensor_shape(out.name))
            if poison_outputs:
                count = int(np.prod(shapes[out.name])) * out.dtype.itemsize // 4
                fill_u32(self.device_buffers[out.name], NAN_BITS, count, self.stream)
        self.stream.record(0)
        if not self.context.execute_async_v3(self.stream.address):
            self.stream.synchronize()
            raise BackendError(f"execute_async_v3 failed on bucket {self.bucket.id}: {trt_logger().last_error}")
        self.stream.record(1)
        views = {}
        for out in self.outputs:
            view = self.host_buffers[out.name].view(shapes[out.name], out.dtype)
            copy_to_host(self.host_buffers[out.name], self.device_buffers[out.name], view.nbytes, self.stream)
            views[out.name] = view
        self.stream.synchronize()
        self.last_gpu_ms = self.stream.elapsed_ms()
        return {name: view.copy() for name, view in views.items()}  # the pinned buffers are reused

    def close(self) -> None:
        self.device.bind()
        self.stream.synchronize()
        for buffer in self.device_buffers.values():
            buffer.free()
        for pinned in self.host_buffers.values():
            pinned.free()
        self.stream.destroy()
        del self.context
