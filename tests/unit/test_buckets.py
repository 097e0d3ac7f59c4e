from __future__ import annotations

import pytest

from worker.compute.imaging import route, target_size
from worker.core.buckets import BucketSpec, ModelSpec, downscale_to_fit, load_model_spec, select_bucket
from worker.core.errors import ConfigError, NoBucketError

BUCKETS = (
    BucketSpec(id="s", min=(1, 32, 32), opt=(8, 320, 320), max=(16, 320, 320)),
    BucketSpec(id="m", min=(1, 32, 32), opt=(4, 480, 640), max=(8, 640, 640)),
    BucketSpec(id="land", min=(1, 32, 32), opt=(2, 640, 960), max=(4, 640, 960)),
    BucketSpec(id="port", min=(1, 32, 32), opt=(2, 960, 640), max=(4, 960, 640)),
    BucketSpec(id="xl", min=(1, 64, 64), opt=(1, 960, 960), max=(2, 960, 960)),
)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (32, 32, "s"),  # fits all but xl; nearest opt is s
        (320, 320, "s"),
        (352, 352, "m"),  # too big for s
        (480, 640, "m"),  # exactly m's opt
        (640, 480, "m"),  # portrait still fits m (square max), nearer than port
        (608, 800, "land"),  # too wide for m
        (800, 608, "port"),
        (640, 960, "land"),
        (960, 640, "port"),
        (704, 960, "xl"),  # only xl holds H > 640 with W > 640
        (960, 960, "xl"),
    ],
)
def test_select_bucket_takes_the_fitting_bucket_with_nearest_opt(height: int, width: int, expected: str) -> None:
    assert select_bucket(BUCKETS, height, width).id == expected


def test_select_bucket_rejects_shapes_outside_every_range() -> None:
    with pytest.raises(NoBucketError, match="992x992"):
        select_bucket(BUCKETS, 992, 992)


def test_ties_go_to_the_smaller_profile() -> None:
    a = BucketSpec(id="big", min=(1, 32, 32), opt=(1, 320, 320), max=(1, 960, 960))
    b = BucketSpec(id="small", min=(1, 32, 32), opt=(1, 320, 320), max=(1, 320, 320))
    assert select_bucket((a, b), 320, 320).id == "small"


def test_downscale_to_fit_keeps_aspect_and_multiple() -> None:
    assert downscale_to_fit(BUCKETS, 1920, 1280, 32) == (960, 640)
    assert downscale_to_fit(BUCKETS, 3000, 3000, 32) == (960, 960)


def _spec(**resize: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "t",
            "onnx": "m.onnx",
            "sha256": "0" * 64,
            "input": "x",
            "output": "y",
            "preprocess": {"resize": {"max_side": 2048, **resize}},
            "buckets": [b.model_dump() for b in BUCKETS],
        }
    )


def test_oversize_inputs_are_downscaled_or_rejected_per_config() -> None:
    bucket, h, w = route(2000, 3000, _spec(oversize="downscale"))
    assert (bucket.id, h, w) == ("land", 640, 960)
    with pytest.raises(NoBucketError):
        route(2000, 3000, _spec(oversize="reject"))


def test_inputs_below_every_minimum_are_rejected_not_upscaled() -> None:
    tiny = BucketSpec(id="t", min=(1, 64, 64), opt=(1, 64, 64), max=(1, 128, 128))
    spec = ModelSpec(name="t", onnx="m.onnx", sha256="0" * 64, input="x", output="y", buckets=(tiny,))
    with pytest.raises(NoBucketError):
        route(10, 10, spec)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(600, 800, (608, 800)), (1, 1, (32, 32)), (3000, 1500, (960, 480)), (480, 640, (480, 640)), (100, 130, (96, 128))],
)
def test_target_size_caps_the_long_side_and_rounds_to_the_multiple(
    spec: ModelSpec, height: int, width: int, expected: tuple[int, int]
) -> None:
    assert target_size(height, width, spec) == expected


def test_bucket_spec_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max on H"):
        BucketSpec(id="bad", min=(1, 64, 32), opt=(1, 32, 32), max=(1, 64, 64))


def test_invalid_spec_file_fails_with_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nonnx: m.onnx\nsha256: abc\ninput: x\noutput: y\nbuckets: []\n")
    with pytest.raises(ConfigError) as info:
        load_model_spec(path)
    assert "sha256" in str(info.value) and "buckets" in str(info.value)


def test_shipped_spec_loads_with_growing_shapes_and_shrinking_batches(spec: ModelSpec) -> None:
    assert len(spec.buckets) >= 4
    areas = [b.max[1] * b.max[2] for b in spec.buckets]
    batches = [b.max_batch for b in spec.buckets]
    assert areas == sorted(areas) and batches == sorted(batches, reverse=True)
    assert spec.engine_input_shapes(spec.buckets[0]) == ((1, 32, 32, 3), (8, 320, 320, 3), (32, 320, 320, 3))
