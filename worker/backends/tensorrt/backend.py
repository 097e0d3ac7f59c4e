"""TensorRTBackend: per bucket, ``instances`` execution lanes (context + stream + buffers) in a pool."""

from __future__ import annotations

import logging
import queue

import tensorrt as trt

from worker.backends.base import Backend, Outputs, Tensor
from worker.backends.tensorrt._cuda import CudaError, Device
from worker.backends.tensorrt._logger import trt_logger
from worker.backends.tensorrt.build import plan_for
from worker.backends.tensorrt.context import BucketContext
from worker.backends.tensorrt.engine import check_profiles, deserialize
from worker.buckets import BucketSpec
from worker.errors import EngineLoadError

logger = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    kind = "tensorrt"
    #: fill outputs with NaN before every run, so a run that writes nothing cannot pass a check
    poison_outputs = False

    def _open(self) -> None:
        settings = self.settings.tensorrt
        self.device = Device(settings.device)
        self.runtime = trt.Runtime(trt_logger())
        plan_path = plan_for(self.spec, self.onnx_path, settings, self.device)
        try:
            self.engine = deserialize(self.runtime, plan_path)
        except EngineLoadError as exc:
            logger.warning("%s; rebuilding the plan", exc)
            self.engine = deserialize(
                self.runtime, plan_for(self.spec, self.onnx_path, settings, self.device, force=True)
            )
        check_profiles(self.engine, self.spec)
        self.lanes: dict[str, queue.SimpleQueue[BucketContext]] = {}
        self._all_lanes: list[BucketContext] = []
        for profile, bucket in enumerate(self.spec.buckets):
            pool: queue.SimpleQueue[BucketContext] = queue.SimpleQueue()
            for _ in range(settings.instances):
                lane = BucketContext(self.engine, self.spec, bucket, profile, self.device)
                pool.put(lane)
                self._all_lanes.append(lane)
            self.lanes[bucket.id] = pool
        logger.info(
            "TensorRT %s on %s (sm %s): %d buckets x %d contexts, each with its own stream",
            trt.__version__,
            self.device.name,
            self.device.compute_capability,
            len(self.spec.buckets),
            settings.instances,
        )

    def instances(self, bucket_id: str) -> int:
        return self.settings.tensorrt.instances

    def _infer(self, bucket: BucketSpec, batch: Tensor) -> Outputs:
        lane = self.lanes[bucket.id].get()
        try:
            return lane.run(batch, self.poison_outputs)
        except CudaError as exc:
            if exc.sticky:
                self.healthy = False
            raise
        finally:
            self.lanes[bucket.id].put(lane)

    def _close(self) -> None:
        for lane in self._all_lanes:
            lane.close()
        del self.engine
        del self.runtime
        self.device.release()

    def describe(self) -> dict[str, str]:
        info = {"kind": self.kind, "version": trt.__version__}
        if hasattr(self, "device"):
            info.update(device=self.device.name, compute_capability=self.device.compute_capability)
        return info
