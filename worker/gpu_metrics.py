"""GPU utilisation and memory per device through NVML, read at scrape time (GPU workers only).

``nvidia-ml-py`` (module ``pynvml``) comes with the ``gpu`` extra and is imported only here, only
when the worker runs the TensorRT backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.core.metrics import PREFIX

logger = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self, nvml: Any, index: int) -> None:
        self._nvml = nvml
        self._index = index
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._name = str(nvml.nvmlDeviceGetName(self._handle))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        values = [str(self._index), self._name]
        util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio", "GPU busy share, last sample period", labels=labels)
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=labels)
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all", labels=labels)
        try:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as exc:
            logger.debug("NVML read failed: %s", exc)
            return
        util.add_metric(values, rates.gpu / 100.0)
        used.add_metric(values, float(memory.used))
        total.add_metric(values, float(memory.total))
        yield from (util, used, total)


def register_gpu_metrics(registry: CollectorRegistry, device: int) -> bool:
    """Add the GPU series when NVML is available; False (and a log line) when it is not."""
    try:
        import pynvml

        pynvml.nvmlInit()
        registry.register(GpuCollector(pynvml, device))
    except Exception as exc:  # no nvidia-ml-py, no driver, no such device
        logger.warning("GPU metrics are off: NVML is not usable (%s)", exc)
        return False
    return True
