"""The engine graph reproduces the CPU preprocessing it replaced, on real photos and the real model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from worker.compute.graph import ENGINE_INPUT, augment, engine_graph, engine_output
from worker.core.buckets import ModelSpec
from worker.core.errors import EngineLoadError

#: ONNX Runtime runs the same float32 ops in both graphs; only fusion may reorder a rounding
RELATIVE_TOLERANCE = 1e-5


def _reference_input(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The normalisation the worker did on the CPU before the graph took it over (float32, NCHW)."""
    pre = spec.preprocess
    if pre.color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    gain = np.array([pre.scale / s for s in pre.std], np.float32)
    offset = np.array([m / s for m, s in zip(pre.mean, pre.std, strict=True)], np.float32)
    return np.ascontiguousarray((image.astype(np.float32) * gain - offset).transpose(2, 0, 1))[None]


def _photos_at_model_sizes(photos: list[Path], count: int = 6) -> list[np.ndarray]:
    picked = []
    for photo in photos[:: max(len(photos) // count, 1)][:count]:
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        h, w = (max(32, min(640, s) // 32 * 32) for s in image.shape[:2])
        picked.append(cv2.resize(image, (w, h)))
    return picked


@pytest.mark.parametrize("color", ["bgr", "rgb"])
def test_uint8_prefix_matches_the_float_preprocessing_on_real_photos(
    spec: ModelSpec, onnx_path: Path, photos: list[Path], color: str
) -> None:
    float_spec = spec.model_copy(
        update={"engine_output": "float32", "preprocess": spec.preprocess.model_copy(update={"color": color})}
    )
    original = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    engine = ort.InferenceSession(engine_graph(onnx_path, float_spec), providers=["CPUExecutionProvider"])
    worst = 0.0
    for image in _photos_at_model_sizes(photos):
        (want,) = original.run([spec.output], {spec.input: _reference_input(image, float_spec)})
        (got,) = engine.run([engine_output(float_spec)], {ENGINE_INPUT: image[None]})
        assert got.shape == want.shape
        error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        worst = max(worst, error)
    assert worst <= RELATIVE_TOLERANCE, f"relative error {worst:.2e} on real photos ({color})"


def test_uint8_output_is_the_map_times_255_rounded(spec: ModelSpec, onnx_path: Path, photos: list[Path]) -> None:
    float_spec = spec.model_copy(update={"engine_output": "float32"})
    as_float = ort.InferenceSession(engine_graph(onnx_path, float_spec), providers=["CPUExecutionProvider"])
    as_uint8 = ort.InferenceSession(engine_graph(onnx_path, spec), providers=["CPUExecutionProvider"])
    for image in _photos_at_model_sizes(photos, 3):
        (prob,) = as_float.run(None, {ENGINE_INPUT: image[None]})
        (quantised,) = as_uint8.run(None, {ENGINE_INPUT: image[None]})
        assert quantised.dtype == np.uint8
        assert np.abs(quantised.astype(np.int32) - np.round(prob * 255)).max() <= 1


def test_a_model_that_does_not_match_the_spec_is_refused(spec: ModelSpec, onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    with pytest.raises(EngineLoadError, match="inputs are"):
        augment(model, spec.model_copy(update={"input": "pixels"}))
    with pytest.raises(EngineLoadError, match="no output"):
        augment(model, spec.model_copy(update={"output": "boxes"}))
