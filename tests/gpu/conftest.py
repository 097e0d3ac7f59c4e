"""GPU fixtures: skip (with the reason) without TensorRT, cuda-python or a GPU; one plan per session.

The plan directory comes from IMGWORKER_BACKEND__TENSORRT__PLAN_DIR, so repeated runs on a warm
GPU machine reuse the plan built by the first (scripts/bench_gpu.py builds the same one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.core.buckets import ModelSpec, load_model_spec
from worker.core.settings import Settings

SMALL_SPEC = Path(__file__).with_name("spec_small.yaml")


def _gpu_missing() -> str | None:
    for module in ("tensorrt", "cuda"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'imgworker[gpu]')"
    from worker.backends.tensorrt._cuda import Device
    from worker.core.errors import EngineLoadError

    try:
        Device(0)
    except EngineLoadError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def gpu() -> None:
    reason = _gpu_missing()
    if reason:
        pytest.skip(f"GPU test: {reason}")


@pytest.fixture(scope="session")
def small_spec() -> ModelSpec:
    return load_model_spec(SMALL_SPEC)


@pytest.fixture(scope="session")
def gpu_settings(gpu: None) -> Settings:
    """Plain fp32 (TF32 off) so parity with ONNX Runtime holds to float32 tolerance."""
    base = Settings.load()
    return Settings.load(
        model_spec=SMALL_SPEC,
        backend={
            "kind": "tensorrt",
            "tensorrt": {**base.backend.tensorrt.model_dump(), "tf32": False, "gpu_jpeg": True},
        },
    )


@pytest.fixture(scope="session")
def trt_backend(gpu_settings: Settings, small_spec: ModelSpec, onnx_path: Path) -> Iterator[Any]:
    from worker.backends.tensorrt.backend import TensorRTBackend

    backend = TensorRTBackend(small_spec, onnx_path, gpu_settings.backend)
    backend.open()
    yield backend
    backend.close()
