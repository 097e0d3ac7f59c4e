"""Architecture guards: CPU code never loads GPU modules; GPU absence is a clear error or a fallback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from worker.backends import open_backend
from worker.core.buckets import ModelSpec
from worker.core.errors import ConfigError
from worker.core.settings import BackendSettings

#: imported only when the TensorRT backend is chosen (GPU metrics come with it); __main__ runs the CLI
GPU_ONLY = ("worker.backends.tensorrt", "worker.gpu_metrics", "worker.__main__")


def test_cpu_modules_never_import_gpu_libraries() -> None:
    """Every module outside the GPU-only ones imports without tensorrt, cuda or NVML being loaded."""
    code = (
        "import pkgutil, sys, worker\n"
        "names = [m.name for m in pkgutil.walk_packages(worker.__path__, 'worker.')]\n"
        f"cpu = [n for n in names if not n.startswith({GPU_ONLY!r})]\n"
        "assert len(cpu) > 20, cpu\n"
        "for name in cpu: __import__(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'pycuda', 'pynvml'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_gpu_extra_is_a_clear_error_or_a_cpu_fallback(spec: ModelSpec, onnx_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend 'tensorrt' is not available .*pip install 'imgworker\[gpu\]'"):
        open_backend(spec, onnx_path, BackendSettings(kind="tensorrt"))
    backend = open_backend(spec, onnx_path, BackendSettings(kind="tensorrt", fallback_to_cpu=True))
    try:
        assert backend.kind == "onnxruntime"
    finally:
        backend.close()


def test_invalid_configuration_stops_the_worker_naming_the_field() -> None:
    env = {"IMGWORKER_REDIS__LEASE_S": "-3", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "redis.lease_s" in proc.stderr and "Traceback" not in proc.stderr
