"""The few CUDA driver calls the backend needs (cuda-python), every status checked.

The driver API on the device's primary context is the context TensorRT itself uses; the current
context is per thread, so each executor thread binds it before its first call.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import numpy as np
import numpy.typing as npt

try:  # cuda-python >= 12.6 / cuda-bindings
    from cuda.bindings import driver as cu
except ImportError:  # older cuda-python 12.x
    from cuda import cuda as cu

from worker.core.errors import BackendError, EngineLoadError

# CUDA's default of 8 hardware work queues is shared by every lane's stream and the JPEG decoder's:
# beside 8 busy contexts an H100's decoder ran 4,383 images/s with 32 queues (the most) and 1,095
# with 8. Set before this process initialises the driver; an operator's own value wins.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

logger = logging.getLogger(__name__)

#: errors after which the context (and so this process's GPU state) cannot be trusted
_STICKY = {
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_UNKNOWN",
}


class CudaError(BackendError):
    def __init__(self, name: str, call: str) -> None:
        super().__init__(f"CUDA {call} failed: {name}")
        self.name = name
        self.sticky = name in _STICKY


def ck(result: Any, call: str = "call") -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise CudaError(name.decode() if name else str(err), call)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_count() -> int:
    ck(cu.cuInit(0), "cuInit")
    return int(ck(cu.cuDeviceGetCount(), "cuDeviceGetCount"))


class Device:
    def __init__(self, ordinal: int, spin_wait: bool = False) -> None:
        try:
            ck(cu.cuInit(0), "cuInit")
            count = ck(cu.cuDeviceGetCount(), "cuDeviceGetCount")
        except (CudaError, RuntimeError) as exc:  # RuntimeError: no driver library (libcuda) at all
            raise EngineLoadError(f"no usable NVIDIA GPU: {exc}") from exc
        if ordinal >= count:
            raise EngineLoadError(f"GPU {ordinal} requested, {count} visible")
        self.ordinal = ordinal
        self.handle = ck(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        self._set_wait(spin_wait)
        self.context = ck(cu.cuDevicePrimaryCtxRetain(self.handle), "cuDevicePrimaryCtxRetain")
        self.bind()
        self.name = ck(cu.cuDeviceGetName(128, self.handle), "cuDeviceGetName").split(b"\0")[0].decode()
        attr = cu.CUdevice_attribute
        major = ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.handle))
        minor = ck(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.handle))
        self.compute_capability = f"{major}.{minor}"

    def _set_wait(self, spin: bool) -> None:
        """How a thread waits for its stream. CUDA's default spins whenever the host has more cores
        than contexts: every lane thread waiting on a batch would burn a core the decoders need."""
        flags = cu.CUctx_flags.CU_CTX_SCHED_SPIN if spin else cu.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC
        try:
            ck(cu.cuDevicePrimaryCtxSetFlags(self.handle, int(flags)), "cuDevicePrimaryCtxSetFlags")
        except CudaError as exc:  # the context is active already (older drivers): it keeps its flags
            logger.warning("cannot set how threads wait for the GPU: %s", exc)

    def bind(self) -> None:
        ck(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def release(self) -> None:
        ck(cu.cuDevicePrimaryCtxRelease(self.handle), "cuDevicePrimaryCtxRelease")


class Stream:
    def __init__(self) -> None:
        self.handle = ck(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self.events = [ck(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate") for _ in range(2)]

    @property
    def address(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        ck(cu.cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def record(self, which: int) -> None:
        ck(cu.cuEventRecord(self.events[which], self.handle), "cuEventRecord")

    def elapsed_ms(self) -> float:
        """GPU time between the two recorded events (after synchronize)."""
        return float(ck(cu.cuEventElapsedTime(self.events[0], self.events[1]), "cuEventElapsedTime"))

    def destroy(self) -> None:
        for event in self.events:
            ck(cu.cuEventDestroy(event), "cuEventDestroy")
        ck(cu.cuStreamDestroy(self.handle), "cuStreamDestroy")


class Event:
    """A point in a stream's work that a host thread sleeps on until the GPU reaches it."""

    def __init__(self) -> None:
        flags = cu.CUevent_flags.CU_EVENT_BLOCKING_SYNC | cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.handle = ck(cu.cuEventCreate(int(flags)), "cuEventCreate")

    def record(self, stream: Stream) -> None:
        ck(cu.cuEventRecord(self.handle, stream.handle), "cuEventRecord")

    def synchronize(self) -> None:
        ck(cu.cuEventSynchronize(self.handle), "cuEventSynchronize")

    def destroy(self) -> None:
        ck(cu.cuEventDestroy(self.handle), "cuEventDestroy")


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.handle = ck(cu.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc")

    @property
    def address(self) -> int:
        return int(self.handle)

    def free(self) -> None:
        ck(cu.cuMemFree(self.handle), "cuMemFree")


class PinnedBuffer:
    """Page-locked host memory, so copies run asynchronously at full PCIe speed."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.address = int(ck(cu.cuMemHostAlloc(max(nbytes, 1), 0), "cuMemHostAlloc"))

    def view(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if count > self.nbytes:
            raise BackendError(f"{shape} {dtype} does not fit a pinned buffer of {self.nbytes} bytes")
        raw = memoryview((ctypes.c_byte * count).from_address(self.address)).cast("B")
        array: npt.NDArray[Any] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return array

    def free(self) -> None:
        ck(cu.cuMemFreeHost(self.address), "cuMemFreeHost")


def register_host(address: int, nbytes: int) -> None:
    """Page-lock existing host memory (another process's shared memory) for direct device copies."""
    ck(cu.cuMemHostRegister(address, nbytes, cu.CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")


def unregister_host(address: int) -> None:
    ck(cu.cuMemHostUnregister(address), "cuMemHostUnregister")


def copy_to_device(dst: DeviceBuffer, src_address: int, nbytes: int, stream: Stream) -> None:
    """From page-locked host memory (a PinnedBuffer's address, or registered memory)."""
    ck(cu.cuMemcpyHtoDAsync(dst.handle, src_address, nbytes, stream.handle), "cuMemcpyHtoDAsync")


def copy_to_host(dst_address: int, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    ck(cu.cuMemcpyDtoHAsync(dst_address, src.handle, nbytes, stream.handle), "cuMemcpyDtoHAsync")


def fill_u8(dst: DeviceBuffer, value: int, count: int, stream: Stream) -> None:
    ck(cu.cuMemsetD8Async(dst.handle, value, count, stream.handle), "cuMemsetD8Async")


def fill_at(address: int, value: int, count: int, stream: Stream) -> None:
    """``count`` bytes of ``value`` at a device address (inside a buffer)."""
    ck(cu.cuMemsetD8Async(address, value, count, stream.handle), "cuMemsetD8Async")


def copy_rows(dst: tuple[int, int], src: tuple[int, int], row_bytes: int, rows: int, stream: Stream) -> None:
    """Device to device, row by row (each side an address and its row pitch): an image into a wider,
    padded slot."""
    copy = cu.CUDA_MEMCPY2D()
    copy.srcMemoryType = cu.CUmemorytype.CU_MEMORYTYPE_DEVICE
    copy.srcDevice, copy.srcPitch = src
    copy.dstMemoryType = cu.CUmemorytype.CU_MEMORYTYPE_DEVICE
    copy.dstDevice, copy.dstPitch = dst
    copy.WidthInBytes = row_bytes
    copy.Height = rows
    ck(cu.cuMemcpy2DAsync(copy, stream.handle), "cuMemcpy2DAsync")


def free_device_memory() -> int:
    """Bytes free on the current device: what a leak would eat."""
    free, _ = ck(cu.cuMemGetInfo(), "cuMemGetInfo")
    return int(free)
