"""Backend selection by name; heavy backends are imported only when chosen."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from worker.backends.base import Backend
from worker.core.buckets import ModelSpec
from worker.core.errors import ConfigError, EngineLoadError
from worker.core.settings import BackendSettings

logger = logging.getLogger(__name__)

BACKENDS = {
    "onnxruntime": "worker.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "worker.backends.tensorrt.backend:TensorRTBackend",
    "fake": "worker.backends.fake:FakeBackend",
    "remote": "worker.backends.remote:RemoteBackend",
}
INSTALL_HINT = {"tensorrt": "pip install 'imgworker[gpu]'", "onnxruntime": "pip install onnxruntime"}


def backend_class(kind: str) -> type[Backend]:
    """Resolve a registered name or a "package.module:Class" path to a Backend subclass."""
    target = BACKENDS.get(kind, kind)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ConfigError(f"backend.kind {kind!r} is neither one of {sorted(BACKENDS)} nor 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = INSTALL_HINT.get(kind, "check backend.kind")
        raise ConfigError(f"backend {kind!r} is not available ({exc}); {hint}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend.kind {kind!r}: {target} is not a Backend subclass")
    return cls


def open_backend(spec: ModelSpec, onnx_path: Path, settings: BackendSettings) -> Backend:
    """Open the configured backend, or ONNX Runtime when a GPU backend cannot start and fallback is on."""
    if not onnx_path.is_file():
        raise ConfigError(f"model file {onnx_path} does not exist; run `python -m worker fetch-assets`")
    try:
        backend = backend_class(settings.kind)(spec, onnx_path, settings)
        backend.open()
        return backend
    except (ConfigError, EngineLoadError) as exc:
        if not settings.fallback_to_cpu or settings.kind == "onnxruntime":
            raise
        logger.warning("backend %s unavailable (%s); falling back to onnxruntime on the CPU", settings.kind, exc)
    backend = backend_class("onnxruntime")(spec, onnx_path, settings)
    backend.open()
    return backend


def device_count() -> int:
    """CUDA devices this process can see (cuda-python, imported only when asked)."""
    from worker.backends.tensorrt._cuda import device_count as cuda_device_count

    return cuda_device_count()
