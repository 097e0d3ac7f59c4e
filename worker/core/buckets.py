"""Model and bucket specs (plain data, no TensorRT) and the routing of an image shape to a bucket.

A bucket is the unit of everything downstream: one TensorRT optimization profile, one execution
context and stream, one batcher queue, one set of metric labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.core.errors import ConfigError, NoBucketError

#: (batch, height, width); channels are fixed by the model spec.
Shape3 = tuple[int, int, int]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BucketSpec(_Frozen):
    """One optimization profile: min/opt/max of (N, H, W), plus its batching knobs."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    min: Shape3
    opt: Shape3
    max: Shape3
    max_wait_ms: Annotated[float, Field(ge=0)] = 10.0

    @model_validator(mode="after")
    def _ordered(self) -> BucketSpec:
        for axis, lo, mid, hi in zip("NHW", self.min, self.opt, self.max, strict=True):
            if not 1 <= lo <= mid <= hi:
                raise ValueError(f"bucket {self.id}: need 1 <= min <= opt <= max on {axis}, got {lo}/{mid}/{hi}")
        return self

    @property
    def max_batch(self) -> int:
        return self.max[0]

    @property
    def opt_batch(self) -> int:
        return self.opt[0]

    def fits(self, height: int, width: int) -> bool:
        return self.min[1] <= height <= self.max[1] and self.min[2] <= width <= self.max[2]

    def contains(self, batch: int, height: int, width: int) -> bool:
        """True when a whole batch shape lies inside the profile (what TensorRT will accept)."""
        return self.min[0] <= batch <= self.max[0] and self.fits(height, width)

    def distance_to_opt(self, height: int, width: int) -> int:
        return abs(height - self.opt[1]) + abs(width - self.opt[2])


class ResizeSpec(_Frozen):
    """Keep the aspect ratio, cap the longer side, round both sides to the model's multiple.

    Each image is then padded (bottom and right) to the next ``pad_multiple``, capped at its
    bucket's max: a shape that depends on the image alone. Only images of equal padded shape share
    a batch, so a result never depends on which images happened to share the batch (padding to a
    companion's size would change what the network sees), while a coarser ``pad_multiple`` lets
    more images batch together at the cost of padding waste.
    """

    max_side: Annotated[int, Field(ge=1)] = 960
    multiple: Annotated[int, Field(ge=1)] = 32
    pad_multiple: Annotated[int, Field(ge=1)] = 32
    oversize: Literal["downscale", "reject"] = "downscale"

    @model_validator(mode="after")
    def _pad_is_a_multiple(self) -> ResizeSpec:
        if self.pad_multiple % self.multiple:
            raise ValueError(f"pad_multiple {self.pad_multiple} must be a multiple of multiple {self.multiple}")
        return self


class PreprocessSpec(_Frozen):
    """``(pixel * scale - mean) / std`` per channel, in the model's channel order (``color``).

    The worker feeds the engine uint8 BGR pixels, NHWC; this normalisation, the channel order and
    the transpose to NCHW run inside the engine (see ``worker.compute.graph``).
    """

    color: Literal["bgr", "rgb"] = "bgr"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: ResizeSpec = ResizeSpec()

    def pad_value(self) -> tuple[int, int, int]:
        """Per BGR input channel, the uint8 value closest to a normalised zero (the mean)."""
        per_model_channel = [min(max(round(m / self.scale), 0), 255) for m in self.mean]
        bgr = per_model_channel if self.color == "bgr" else per_model_channel[::-1]
        return bgr[0], bgr[1], bgr[2]


class PostprocessSpec(_Frozen):
    """Differentiable-binarization (DBNet) box extraction, as PaddleOCR's text detectors use."""

    kind: Literal["db_text_boxes"] = "db_text_boxes"
    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip_ratio: float = 1.6
    max_candidates: int = 1000
    min_size: int = 3
    use_dilation: bool = True


class ModelSpec(_Frozen):
    name: str
    onnx: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    #: the model's own float32 NCHW input and its probability-map output
    input: str
    output: str
    channels: Literal[3] = 3
    #: uint8 (the map times 255, rounded, inside the engine) copies a quarter of the bytes back
    engine_output: Literal["uint8", "float32"] = "uint8"
    preprocess: PreprocessSpec = PreprocessSpec()
    postprocess: PostprocessSpec = PostprocessSpec()
    buckets: Annotated[tuple[BucketSpec, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _buckets_consistent(self) -> ModelSpec:
        ids = [b.id for b in self.buckets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"bucket ids must be unique, got {ids}")
        multiple = self.preprocess.resize.multiple
        for bucket in self.buckets:
            for shape in (bucket.min, bucket.opt, bucket.max):
                if shape[1] % multiple or shape[2] % multiple:
                    raise ValueError(f"bucket {bucket.id}: H and W must be multiples of {multiple}, got {shape}")
        return self

    def bucket(self, bucket_id: str) -> BucketSpec:
        for bucket in self.buckets:
            if bucket.id == bucket_id:
                return bucket
        raise KeyError(bucket_id)

    def engine_input_shapes(self, bucket: BucketSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The (min, opt, max) NHWC uint8 shapes of the engine input for one bucket's profile."""
        c = self.channels
        return tuple((s[0], s[1], s[2], c) for s in (bucket.min, bucket.opt, bucket.max))  # type: ignore[return-value]


def load_model_spec(path: Path) -> ModelSpec:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model spec {path}: {exc}") from exc
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid model spec {path}: {exc}") from exc


def select_bucket(buckets: tuple[BucketSpec, ...], height: int, width: int) -> BucketSpec:
    """Among the buckets whose range holds (height, width), the one with the nearest ``opt`` wins.

    Ties go to the bucket with the smaller max area, the cheaper profile to pad into.
    """
    fitting = [b for b in buckets if b.fits(height, width)]
    if not fitting:
        raise NoBucketError(f"a {height}x{width} input fits no bucket")
    return min(fitting, key=lambda b: (b.distance_to_opt(height, width), b.max[1] * b.max[2]))


def downscale_to_fit(buckets: tuple[BucketSpec, ...], height: int, width: int, multiple: int) -> tuple[int, int]:
    """The largest size, aspect kept and rounded down to ``multiple``, that fits some bucket."""
    best: tuple[int, int] | None = None
    for bucket in buckets:
        scale = min(bucket.max[1] / height, bucket.max[2] / width, 1.0)
        h = max(int(height * scale) // multiple * multiple, multiple)
        w = max(int(width * scale) // multiple * multiple, multiple)
        if bucket.fits(h, w) and (best is None or h * w > best[0] * best[1]):
            best = (h, w)
    if best is None:
        raise NoBucketError(f"a {height}x{width} input fits no bucket even when downscaled")
    return best
