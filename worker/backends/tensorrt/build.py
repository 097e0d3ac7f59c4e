"""Engine graph → serialized plan with one optimization profile per bucket, cached on disk.

The plan is built from the engine graph (``worker.compute.graph``: uint8 pixels in, normalisation inside).
The cache key covers everything that makes a plan valid: the engine graph's sha256 (so the model
file, the preprocessing and the output type), the buckets, the TensorRT version, the GPU (name and
compute capability) and the build options. A plan whose key or
checksum does not match is rebuilt, never trusted. Builds in one plan directory are serialised by a
file lock, and share a timing cache so rebuilds skip tactic timing they have done before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tensorrt as trt

from worker.backends.tensorrt import _compat
from worker.backends.tensorrt._cuda import Device
from worker.backends.tensorrt._logger import trt_logger
from worker.compute.graph import ENGINE_INPUT, engine_graph
from worker.core.buckets import ModelSpec
from worker.core.errors import ConfigError, EngineLoadError
from worker.core.settings import TensorRTSettings

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 15.0


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def plan_key(spec: ModelSpec, graph: bytes, settings: TensorRTSettings, device: Device) -> dict[str, Any]:
    return {
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "profiles": [[b.id, b.min, b.opt, b.max] for b in spec.buckets],
        "tensorrt": _compat.VERSION,
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "fp16": settings.fp16,
        "tf32": settings.tf32,
        "optimization_level": settings.optimization_level,
        "workspace_mib": settings.workspace_mib,
        "tactic_sources": settings.tactic_sources,
    }


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _progress(what: str) -> Iterator[None]:
    """Log the elapsed time every few seconds while a long call runs."""
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            logger.info("%s: %.0f s elapsed", what, time.monotonic() - started)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        logger.info("%s: done in %.1f s", what, time.monotonic() - started)


def build_plan(spec: ModelSpec, graph: bytes, settings: TensorRTSettings, timing_cache: Path) -> bytes:
    log = trt_logger()
    builder = trt.Builder(log)
    network = builder.create_network(_compat.network_flags())
    parser = trt.OnnxParser(network, log)
    if not parser.parse(graph):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineLoadError(f"TensorRT cannot parse the engine graph of {spec.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    if settings.tactic_sources is not None:
        config.set_tactic_sources(_compat.tactic_source_mask(settings.tactic_sources))
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    _compat.configure_precision(config, settings.fp16)
    _compat.allow_profile_sharing(config)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    for index, bucket in enumerate(spec.buckets):
        profile = builder.create_optimization_profile()
        profile.set_shape(ENGINE_INPUT, *spec.engine_input_shapes(bucket))
        if config.add_optimization_profile(profile) != index:
            raise EngineLoadError(f"profile for bucket {bucket.id} was not added as profile {index}")
    shapes = ", ".join(f"{b.id} {b.min}..{b.max}" for b in spec.buckets)
    logger.info("building a TensorRT %s plan, profiles: %s", _compat.VERSION, shapes)
    with _progress("plan build"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineLoadError(f"TensorRT could not build the plan: {log.last_error or 'see the log'}")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def plan_for(
    spec: ModelSpec, onnx_path: Path, settings: TensorRTSettings, device: Device | None = None, force: bool = False
) -> Path:
    """The cached plan for this model, spec, TensorRT and GPU; built when missing, stale or corrupt."""
    device = device or Device(settings.device, settings.spin_wait)
    onnx_sha256 = sha256_of(onnx_path)
    if onnx_sha256 != spec.sha256:
        raise ConfigError(f"{onnx_path} has sha256 {onnx_sha256}, the spec {spec.name} pins {spec.sha256}")
    graph = engine_graph(onnx_path, spec)
    key = plan_key(spec, graph, settings, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    plan_dir = settings.plan_dir
    plan_path = plan_dir / f"{spec.name}-{digest[:16]}.plan"
    meta_path = plan_path.with_suffix(".json")
    with _locked(plan_dir):
        if not force and plan_is_valid(plan_path, meta_path, key):
            logger.info("plan cache hit: %s", plan_path)
            return plan_path
        timing_cache = plan_dir / f"timing-{_compat.VERSION}-{device.compute_capability}.cache"
        started = time.monotonic()
        plan = build_plan(spec, graph, settings, timing_cache)
        build_s = round(time.monotonic() - started, 1)
        partial = plan_path.with_suffix(".partial")
        partial.write_bytes(plan)
        partial.replace(plan_path)
        meta = {"key": key, "plan_sha256": hashlib.sha256(plan).hexdigest(), "build_s": build_s}
        meta_path.write_text(json.dumps(meta, indent=1))
        logger.info("plan written: %s (%d bytes)", plan_path, len(plan))
    return plan_path


def plan_is_valid(plan_path: Path, meta_path: Path, key: dict[str, Any]) -> bool:
    if not (plan_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if json.loads(json.dumps(key)) != meta.get("key"):
        logger.warning("plan %s was built for other inputs; rebuilding", plan_path)
        return False
    if sha256_of(plan_path) != meta.get("plan_sha256"):
        logger.warning("plan %s is corrupt (checksum mismatch); rebuilding", plan_path)
        return False
    return True
