"""TensorRTBackend: per bucket, ``instances`` execution contexts on its profile, and twice as many
lanes (stream, buffers) that borrow them to execute; one JPEG decoder for the device."""

from __future__ import annotations

import logging
from typing import Any

import tensorrt as trt

from worker.backends.base import Backend, HostBlock, Lane
from worker.backends.tensorrt._cuda import CudaError, Device, register_host, unregister_host
from worker.backends.tensorrt._logger import trt_logger
from worker.backends.tensorrt.build import plan_for
from worker.backends.tensorrt.contexts import LANES_PER_CONTEXT, BucketContexts
from worker.backends.tensorrt.engine import check_profiles, deserialize
from worker.backends.tensorrt.jpeg_decoder import DECODE_BATCH, DeviceJpegDecoder, load_nvimgcodec
from worker.backends.tensorrt.lane import TensorRTLane
from worker.core.buckets import BucketSpec
from worker.core.errors import EngineLoadError

logger = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    kind = "tensorrt"

    def _open(self) -> None:
        settings = self.settings.tensorrt
        self.device = Device(settings.device, settings.spin_wait)
        self.runtime = trt.Runtime(trt_logger())
        self.plan_path = plan_for(self.spec, self.onnx_path, settings, self.device)
        try:
            self.engine = deserialize(self.runtime, self.plan_path)
        except EngineLoadError as exc:
            logger.warning("%s; rebuilding the plan", exc)
            self.plan_path = plan_for(self.spec, self.onnx_path, settings, self.device, force=True)
            self.engine = deserialize(self.runtime, self.plan_path)
        check_profiles(self.engine, self.spec)
        codec = load_nvimgcodec(self.device, self.spec.preprocess.pad_value()) if settings.gpu_jpeg else None
        self.nvimgcodec: Any = codec[0] if codec else None
        self._jpeg_decode = codec[1] if codec else "cpu"
        self.jpeg_decoder = (
            DeviceJpegDecoder(
                self.nvimgcodec,
                self.device,
                self.spec.preprocess.pad_value()[0],
                (max(b.max[1] for b in self.spec.buckets), max(b.max[2] for b in self.spec.buckets)),
                max(DECODE_BATCH, *(b.max_batch for b in self.spec.buckets)),
            )
            if codec
            else None
        )
        self._contexts: list[BucketContexts] = []
        logger.info(
            "TensorRT %s on %s (sm %s): %d buckets x %d contexts, %d lanes each with its own stream",
            trt.__version__,
            self.device.name,
            self.device.compute_capability,
            len(self.spec.buckets),
            settings.instances,
            settings.instances * LANES_PER_CONTEXT,
        )

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        self.device.bind()
        contexts = BucketContexts(self.engine, self.spec, bucket, profile, self.settings.tensorrt.instances)
        self._contexts.append(contexts)
        return [
            TensorRTLane(
                contexts,
                self.spec,
                bucket,
                device=self.device,
                on_sticky=self._sticky_error,
                jpeg_decoder=self.jpeg_decoder,
            )
            for _ in range(len(contexts) * LANES_PER_CONTEXT)
        ]

    def pin(self, block: HostBlock) -> None:
        """Page-lock a worker's shared memory, so lanes copy straight from and into it."""
        self.device.bind()
        try:
            register_host(block.address, len(block.buffer))
        except CudaError as exc:  # e.g. a locked-memory limit: the staging copies still work
            logger.warning("cannot pin a worker's shared memory (%s); its batches go through staging copies", exc)
            return
        block.pinned = True

    def unpin(self, block: HostBlock) -> None:
        if block.pinned:
            self.device.bind()
            unregister_host(block.address)
            block.pinned = False

    def _sticky_error(self) -> None:
        """A CUDA error that poisons the context: this process cannot use the GPU any more."""
        self.healthy = False

    @property
    def jpeg_decode(self) -> str:
        return getattr(self, "_jpeg_decode", "cpu")

    def _close(self) -> None:
        for contexts in self._contexts:
            contexts.close()
        if self.jpeg_decoder is not None:
            self.jpeg_decoder.close()
        del self.engine
        del self.runtime
        self.device.release()

    def describe(self) -> dict[str, str]:
        info = {"kind": self.kind, "tensorrt": trt.__version__, "jpeg_decode": self.jpeg_decode}
        if hasattr(self, "device"):
            info.update(device=self.device.name, compute_capability=self.device.compute_capability)
        if hasattr(self, "plan_path"):
            info.update(plan=self.plan_path.stem)
        return info
