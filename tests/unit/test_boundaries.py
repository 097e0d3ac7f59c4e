"""Architecture guards: CPU code never loads GPU modules; GPU absence is a clear error or a fallback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from worker.backends import open_backend
from worker.buckets import ModelSpec
from worker.errors import ConfigError
from worker.settings import BackendSettings

CPU_MODULES = [
    "worker.cli", "worker.service", "worker.broker", "worker.client", "worker.http", "worker.assets",
    "worker.backends", "worker.backends.onnxruntime", "worker.imaging", "worker.postprocess",
]  # fmt: skip


def test_cpu_modules_never_import_tensorrt_or_cuda() -> None:
    code = (
        f"import sys\nfor m in {CPU_MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'pycuda'))\n"
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
