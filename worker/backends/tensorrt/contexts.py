"""A bucket's execution contexts, lent to its lanes for the execution alone.

A context holds TensorRT's activation memory for one batch in flight, the costly part; a lane holds
what a batch needs before and after (its stream, device and pinned buffers). A
bucket has twice as many lanes as contexts and a lane borrows a context only once its inputs are on
the device, so one batch copies in and decodes while another executes, and no context waits on a
JPEG decode. A borrowed context is pointed at the lane's own tensors and given the batch's shape,
each only when it changes.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from worker.backends.tensorrt import _compat
from worker.backends.tensorrt._cuda import Stream
from worker.backends.tensorrt.engine import TensorInfo, io_tensors
from worker.compute.graph import ENGINE_INPUT
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import EngineLoadError, ShapeOutOfProfileError

#: lanes per execution context: one batch is copied in and decoded while the other executes
LANES_PER_CONTEXT = 2


class Context:
    """One execution context bound to the bucket's profile, and what it was last set to."""

    def __init__(self, engine: Any, profile: int, bucket: BucketSpec) -> None:
        self.trt = _compat.create_context(engine)
        if self.trt is None:
            raise EngineLoadError(f"cannot create an execution context for bucket {bucket.id} (out of GPU memory?)")
        stream = Stream()
        try:
            if not self.trt.set_optimization_profile_async(profile, stream.address):
                raise EngineLoadError(f"cannot bind profile {profile} to a context of bucket {bucket.id}")
            stream.synchronize()
        finally:
            stream.destroy()
        self.shape: tuple[int, ...] = ()
        #: the tensor addresses it was last pointed at (a lane's buffers)
        self.addresses: dict[str, int] = {}

    def prepare(self, input_name: str, shape: tuple[int, ...], addresses: dict[str, int], profile: int) -> None:
        """The batch's input shape and the lane's tensors, set only where they differ from last time."""
        if shape != self.shape:
            # TensorRT 8.6's set_input_shape accepts shapes outside the profile: Lane.run checked it first
            if not self.trt.set_input_shape(input_name, shape):
                raise ShapeOutOfProfileError(f"TensorRT rejected shape {shape} on profile {profile}")
            self.shape = shape
        if addresses != self.addresses:
            for name, address in addresses.items():
                self.trt.set_tensor_address(name, address)
            self.addresses = dict(addresses)


class BucketContexts:
    """The contexts of one bucket's profile, and the byte sizes its lanes' buffers need."""

    def __init__(self, engine: Any, spec: ModelSpec, bucket: BucketSpec, profile: int, count: int) -> None:
        self.profile = profile
        tensors = io_tensors(engine)
        self.input_tensor: TensorInfo = next(t for t in tensors if t.is_input)
        if self.input_tensor.name != ENGINE_INPUT or self.input_tensor.dtype != np.uint8:
            raise EngineLoadError(
                f"plan input is {self.input_tensor.name} {self.input_tensor.dtype}, expected {ENGINE_INPUT} uint8"
            )
        self.output_tensors = [t for t in tensors if not t.is_input]
        self._all = [Context(engine, profile, bucket) for _ in range(count)]
        first = self._all[0].trt
        max_shape = spec.engine_input_shapes(bucket)[2]
        if not first.set_input_shape(self.input_tensor.name, max_shape):
            raise EngineLoadError(f"profile {profile} rejects its own max shape {max_shape}")
        self._all[0].shape = max_shape
        #: bytes of each tensor at the profile's max shape: what a lane allocates
        self.sizes = {self.input_tensor.name: int(np.prod(max_shape))}
        for out in self.output_tensors:
            shape = tuple(first.get_tensor_shape(out.name))
            if min(shape) < 0:
                raise EngineLoadError(f"output {out.name} has a data-dependent shape {shape}; not supported")
            self.sizes[out.name] = int(np.prod(shape)) * out.dtype.itemsize
        self._free: queue.SimpleQueue[Context] = queue.SimpleQueue()
        for context in self._all:
            self._free.put(context)

    def __len__(self) -> int:
        return len(self._all)

    @contextmanager
    def borrow(self) -> Iterator[Context]:
        """A free context, waiting for one; given back when the block ends."""
        context = self._free.get()
        try:
            yield context
        finally:
            self._free.put(context)

    def close(self) -> None:
        """After every lane is closed (nothing is borrowed): the contexts go before their engine."""
        self._all.clear()
        self._free = queue.SimpleQueue()
