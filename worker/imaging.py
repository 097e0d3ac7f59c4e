"""Bytes to model input: guarded decode, colour/depth normalisation, aspect-keeping resize, routing.

Synchronous and free of Redis and backends, so it runs in a thread pool and is tested on its own.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

# OpenCV's own pixel cap, read once when it first decodes: the backstop for formats whose header
# this module does not parse. The configured, tighter limit is enforced below.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))

import cv2
import numpy as np
import numpy.typing as npt

from worker.buckets import BucketSpec, ModelSpec, downscale_to_fit, select_bucket
from worker.errors import DecodeError, ImageTooLargeError, NoBucketError

cv2.setNumThreads(1)  # parallelism comes from the decode pool, not from inside each call

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})

ImageU8 = npt.NDArray[np.uint8]
Tensor = npt.NDArray[np.float32]


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header without decoding pixels; None if not found."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data.startswith(JPEG_SOI):
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker in _JPEG_SOF_MARKERS:
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return height, width
            pos += 2 + length
    return None


def _jpeg_truncated(data: bytes) -> bool:
    """True when the last scan has no end-of-image marker after it (entropy data never holds FFD9)."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0


def _composite_on_white(image: npt.NDArray[np.uint8]) -> ImageU8:
    color, alpha = image[..., :-1].astype(np.float32), image[..., -1:].astype(np.float32) / 255.0
    out = color * alpha + 255.0 * (1.0 - alpha)
    composite: ImageU8 = out.round().astype(np.uint8)
    return composite[..., 0] if composite.shape[2] == 1 else composite


def to_bgr8(decoded: npt.NDArray[Any]) -> ImageU8:
    """Any decoded layout (gray, gray+alpha, BGRA, 16-bit, float) as 3-channel 8-bit BGR."""
    image: ImageU8
    if decoded.dtype == np.uint16:
        image = (decoded >> 8).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        gain = 255.0 if decoded.dtype.kind == "f" else 1.0
        image = np.clip(decoded.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    else:
        image = decoded
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 2:
        image = _composite_on_white(image)
    elif channels == 4:
        return _composite_on_white(image)
    if channels in (1, 2):
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    return image


def decode_image(data: bytes, max_pixels: int) -> ImageU8:
    """Decode to upright BGR uint8 (EXIF orientation applied for JPEG); reject bombs before decoding."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("image is empty (0 bytes)")
    size = header_size(bytes(data[:65536]))
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(f"image is {size[1]}x{size[0]} pixels, the limit is {max_pixels} pixels")
    is_png = bytes(data[:8]) == PNG_SIGNATURE
    if bytes(data[:2]) == JPEG_SOI and _jpeg_truncated(bytes(data)):
        raise DecodeError("JPEG is truncated (no end-of-image marker after the last scan)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        # PNG keeps its alpha and depth (composited below); everything else decodes to colour with
        # EXIF orientation applied by OpenCV.
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED if is_png else cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise DecodeError(f"image could not be decoded: {str(exc).strip().splitlines()[-1]}") from exc
    if image is None or image.size == 0:
        raise DecodeError("bytes are not a decodable image (unknown format, truncated or corrupt)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageTooLargeError(f"image is {image.shape[1]}x{image.shape[0]} pixels, the limit is {max_pixels} pixels")
    return to_bgr8(image)


@dataclass(frozen=True)
class Prepared:
    """One image ready for batching: its normalised CHW tensor, its padded shape, how to map back."""

    tensor: Tensor
    bucket: BucketSpec
    original_height: int
    original_width: int
    padded_height: int
    padded_width: int

    @property
    def height(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def width(self) -> int:
        return int(self.tensor.shape[2])


def target_size(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Aspect-keeping size with the longer side capped (never upscaled), rounded to the multiple."""
    resize = spec.preprocess.resize
    scale = min(1.0, resize.max_side / max(height, width))
    m = resize.multiple
    return max(round(height * scale / m) * m, m), max(round(width * scale / m) * m, m)


def route(height: int, width: int, spec: ModelSpec) -> tuple[BucketSpec, int, int]:
    """The bucket and final input size for an image; oversize inputs are downscaled or rejected."""
    h, w = target_size(height, width, spec)
    try:
        return select_bucket(spec.buckets, h, w), h, w
    except NoBucketError:
        larger_than_all = all(h > b.max[1] or w > b.max[2] for b in spec.buckets)
        if not larger_than_all or spec.preprocess.resize.oversize == "reject":
            raise
    h, w = downscale_to_fit(spec.buckets, h, w, spec.preprocess.resize.multiple)
    return select_bucket(spec.buckets, h, w), h, w


def normalize(image: ImageU8, spec: ModelSpec) -> Tensor:
    pre = spec.preprocess
    if pre.color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # type: ignore[assignment]
    gain = np.array([pre.scale / s for s in pre.std], dtype=np.float32)
    offset = np.array([m / s for m, s in zip(pre.mean, pre.std, strict=True)], dtype=np.float32)
    hwc = image.astype(np.float32) * gain - offset
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def prepare(data: bytes, spec: ModelSpec, max_pixels: int) -> Prepared:
    image = decode_image(data, max_pixels)
    height, width = image.shape[:2]
    bucket, h, w = route(height, width, spec)
    resized: ImageU8 = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)  # type: ignore[assignment]
    grid = spec.preprocess.resize.pad_multiple
    padded_h = min(-(-h // grid) * grid, bucket.max[1])
    padded_w = min(-(-w // grid) * grid, bucket.max[2])
    return Prepared(normalize(resized, spec), bucket, height, width, padded_h, padded_w)


def pad_batch(items: list[Prepared]) -> tuple[Tensor, float]:
    """Stack images of one padded shape into an NCHW batch (zeros right and below each image).

    Returns the batch and the padding waste: the share of batch pixels that are padding.
    """
    height, width = items[0].padded_height, items[0].padded_width
    if any((p.padded_height, p.padded_width) != (height, width) for p in items):
        raise ValueError("a batch takes images of one padded shape only")
    channels = items[0].tensor.shape[0]
    batch = np.zeros((len(items), channels, height, width), dtype=np.float32)
    for i, p in enumerate(items):
        batch[i, :, : p.height, : p.width] = p.tensor
    valid = sum(p.height * p.width for p in items)
    return batch, 1.0 - valid / (len(items) * height * width)
