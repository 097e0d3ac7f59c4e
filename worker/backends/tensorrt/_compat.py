"""Every TensorRT 8.6 / 10 / 11 difference this project meets, probed at the narrowest point.

| topic               | 8.6                           | 10.x                              | 11.x                     |
| ------------------- | ----------------------------- | --------------------------------- | ------------------------ |
| network flags       | EXPLICIT_BATCH required       | explicit batch implied            | strongly typed always    |
| FP16 precision      | BuilderFlag.FP16              | BuilderFlag.FP16 (deprecated 10.12)| gone: the ONNX carries it |
| contexts per profile| PROFILE_SHARING_0806 preview  | always allowed                    | always allowed           |
| context memory      | static (max over profiles)    | ON_PROFILE_CHANGE strategy        | ON_PROFILE_CHANGE        |
"""

from __future__ import annotations

from typing import Any

import tensorrt as trt

from worker.core.errors import UnsupportedFeatureError

VERSION = trt.__version__
MAJOR = int(VERSION.split(".")[0])


def require(feature: str, available: bool, hint: str = "") -> None:
    if not available:
        raise UnsupportedFeatureError(
            f"{feature} is not available on TensorRT {VERSION}" + (f": {hint}" if hint else "")
        )


def network_flags() -> int:
    """Explicit batch where it still exists (8.x); TensorRT 10 implies it and 11 is always strongly typed."""
    flags = 0
    if MAJOR < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return flags


def configure_precision(config: Any, fp16: bool) -> None:
    """FP16 as a builder flag on 8.6/10; on 11 precision is the model's own (strong typing)."""
    if not fp16:
        return
    require(
        "the FP16 builder flag",
        MAJOR < 11 and hasattr(trt.BuilderFlag, "FP16"),
        "TensorRT 11 networks are strongly typed; convert the ONNX to mixed precision first "
        "(e.g. ModelOpt AutoCast with keep_io_types) and build it with fp16 off",
    )
    config.set_flag(trt.BuilderFlag.FP16)


def allow_profile_sharing(config: Any) -> None:
    """Let several contexts use one profile (our ``instances``): a preview feature on 8.6 only."""
    feature = getattr(trt.PreviewFeature, "PROFILE_SHARING_0806", None) if MAJOR < 10 else None
    if feature is not None:
        config.set_preview_feature(feature, True)


def tactic_source_mask(names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        require(f"tactic source {name!r}", hasattr(trt.TacticSource, name))
        mask |= 1 << int(getattr(trt.TacticSource, name))
    return mask


def create_context(engine: Any) -> Any:
    """A context whose activation memory is sized for its own profile where TensorRT can (10+)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None and hasattr(strategy, "ON_PROFILE_CHANGE"):
        return engine.create_execution_context(strategy.ON_PROFILE_CHANGE)
    return engine.create_execution_context()
