"""The engine graph: the model with its preprocessing prepended and, optionally, its output quantised.

The worker hands every backend uint8 BGR pixels in NHWC, straight from the decoder, a quarter of
the bytes of float32. A few standard ONNX ops in front of the model do what the CPU used to:

    image uint8 [N,H,W,3] -> Cast float -> (Gather channels, for RGB models) -> Transpose NCHW
                          -> Mul scale/std -> Sub mean/std -> the model's own input

and, with ``engine_output: uint8``, after it: map * 255 -> Round -> Cast uint8. ONNX Runtime and
TensorRT run the same augmented graph, so the CPU and GPU paths share one definition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import EngineLoadError

ENGINE_INPUT = "image"
_PREFIX = "imgworker_pre_"
_SUFFIX = "imgworker_post_"


def engine_output(spec: ModelSpec) -> str:
    """The name of the probability map the engine returns."""
    return f"{spec.output}_uint8" if spec.engine_output == "uint8" else spec.output


def augment(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """A copy of ``model`` taking uint8 NHWC pixels and returning the spec's engine output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inputs = [i.name for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    if inputs != [spec.input]:
        raise EngineLoadError(f"model inputs are {inputs}, the spec expects [{spec.input!r}]")
    if spec.output not in [o.name for o in graph.output]:
        raise EngineLoadError(f"model has no output {spec.output!r}")
    normalised = f"{_PREFIX}normalised"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == spec.input:
                node.input[i] = normalised

    pre = spec.preprocess
    gain = np.array([pre.scale / s for s in pre.std], np.float32).reshape(1, 3, 1, 1)
    offset = np.array([m / s for m, s in zip(pre.mean, pre.std, strict=True)], np.float32).reshape(1, 3, 1, 1)
    initializers = [
        numpy_helper.from_array(gain, f"{_PREFIX}gain"),
        numpy_helper.from_array(offset, f"{_PREFIX}offset"),
    ]
    nodes = [helper.make_node("Cast", [ENGINE_INPUT], [f"{_PREFIX}float"], to=TensorProto.FLOAT)]
    channels_in = f"{_PREFIX}float"
    if pre.color == "rgb":  # decoded pixels are BGR
        initializers.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{_PREFIX}rgb"))
        nodes.append(helper.make_node("Gather", [channels_in, f"{_PREFIX}rgb"], [f"{_PREFIX}ordered"], axis=3))
        channels_in = f"{_PREFIX}ordered"
    nodes += [
        helper.make_node("Transpose", [channels_in], [f"{_PREFIX}nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", [f"{_PREFIX}nchw", f"{_PREFIX}gain"], [f"{_PREFIX}scaled"]),
        helper.make_node("Sub", [f"{_PREFIX}scaled", f"{_PREFIX}offset"], [normalised]),
    ]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(ENGINE_INPUT, TensorProto.UINT8, ["N", "H", "W", 3]))

    if spec.engine_output == "uint8":
        initializers.append(numpy_helper.from_array(np.array(255.0, np.float32), f"{_SUFFIX}scale"))
        graph.node.extend(
            [
                helper.make_node("Mul", [spec.output, f"{_SUFFIX}scale"], [f"{_SUFFIX}scaled"]),
                helper.make_node("Round", [f"{_SUFFIX}scaled"], [f"{_SUFFIX}rounded"]),
                helper.make_node("Cast", [f"{_SUFFIX}rounded"], [engine_output(spec)], to=TensorProto.UINT8),
            ]
        )
    kept = [o for o in graph.output if o.name == spec.output]
    del graph.output[:]
    if spec.engine_output == "uint8":
        graph.output.append(helper.make_tensor_value_info(engine_output(spec), TensorProto.UINT8, ["N", 1, "H", "W"]))
    else:
        graph.output.extend(kept)
    graph.initializer.extend(initializers)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise EngineLoadError(f"the augmented graph is invalid: {exc}") from exc
    return out


def engine_graph(onnx_path: Path, spec: ModelSpec) -> bytes:
    """The serialized engine graph for a model file."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # onnx raises DecodeError, OSError and others for a bad file
        raise EngineLoadError(f"cannot read the ONNX model {onnx_path}: {exc}") from exc
    serialized: bytes = augment(model, spec).SerializeToString()
    return serialized


def output_capacity(spec: ModelSpec, bucket: BucketSpec) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Each engine output's dtype and largest shape for a bucket (what a buffer must hold)."""
    dtype = np.dtype(np.uint8 if spec.engine_output == "uint8" else np.float32)
    n, h, w = bucket.max
    return {engine_output(spec): (dtype, (n, 1, h, w))}
