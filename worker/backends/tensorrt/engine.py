"""Deserialize a plan and check that its optimization profiles are exactly the configured buckets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from worker.backends.tensorrt._logger import trt_logger
from worker.compute.graph import ENGINE_INPUT
from worker.core.buckets import ModelSpec
from worker.core.errors import EngineLoadError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype[Any]
    is_input: bool


def deserialize(runtime: Any, plan_path: Path) -> Any:
    """The engine; ``runtime`` must outlive it (TensorRT requires the runtime to be destroyed last)."""
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineLoadError(f"TensorRT could not deserialize {plan_path}: {trt_logger().last_error}")
    return engine


def io_tensors(engine: Any) -> list[TensorInfo]:
    return [
        TensorInfo(
            name,
            np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
            engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
        )
        for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
    ]


def check_profiles(engine: Any, spec: ModelSpec) -> None:
    """Profile i must be bucket i, shape for shape: a plan for other buckets is never used."""
    inputs = [t.name for t in io_tensors(engine) if t.is_input]
    if inputs != [ENGINE_INPUT]:
        raise EngineLoadError(f"plan inputs are {inputs}, the engine graph has [{ENGINE_INPUT!r}]")
    if engine.num_optimization_profiles != len(spec.buckets):
        raise EngineLoadError(f"plan has {engine.num_optimization_profiles} profiles for {len(spec.buckets)} buckets")
    for index, bucket in enumerate(spec.buckets):
        actual = tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(ENGINE_INPUT, index))
        wanted = spec.engine_input_shapes(bucket)
        if actual != wanted:
            raise EngineLoadError(f"profile {index} is {actual}, bucket {bucket.id} needs {wanted}")
