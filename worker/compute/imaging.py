"""Bytes to engine input: header probe, bounded decode, 8-bit BGR, aspect-keeping resize, routing.

Synchronous and free of Redis and backends, so it runs in a thread pool and is tested on its own.
Memory stays bounded for hostile input: every accepted format's dimensions and sample size are
read from its header before any pixel is decoded, each decode reserves its decoded size from a
shared ``ByteBudget`` first, and conversions to 8 bits run in row chunks.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# OpenCV's own pixel cap, read once when it first decodes: a backstop behind the header checks.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))
# A hostile image is one job's decode_error, reported in its result: not an ERROR line in the log.
os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from worker.compute import jpeg
from worker.core.buckets import BucketSpec, ModelSpec, downscale_to_fit, select_bucket
from worker.core.errors import DecodeError, ImageTooLargeError, InternalError, NoBucketError

cv2.setNumThreads(1)  # parallelism comes from the decode pool, not from inside each call
Image.MAX_IMAGE_PIXELS = None  # our own limits apply, from the header, before Pillow decodes anything
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # corrupt metadata: decoded anyway

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
#: formats read through Pillow's header parsers (never EPS and the like, which run external programs)
PILLOW_FORMATS = ("WEBP", "TIFF", "BMP", "GIF", "PPM", "TGA", "JPEG", "PNG")
#: channel count and bytes per sample of Pillow modes; anything else is converted to RGB(A) first
_PILLOW_MODES: dict[str, tuple[int, int]] = {
    "1": (1, 1),
    "L": (1, 1),
    "P": (4, 1),
    "LA": (2, 1),
    "PA": (4, 1),
    "RGB": (3, 1),
    "RGBA": (4, 1),
    "RGBX": (4, 1),
    "CMYK": (4, 1),
    "YCbCr": (3, 1),
    "I;16": (1, 2),
    "I;16B": (1, 2),
    "I;16L": (1, 2),
    "I;16N": (1, 2),
    "I": (1, 4),
    "F": (1, 4),
}
_CHUNK_PIXELS = 1 << 20  # conversions to 8 bits touch at most this many pixels at a time

ImageU8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ImageInfo:
    """What a header says, before any pixel is decoded."""

    format: str
    height: int
    width: int
    channels: int
    bytes_per_sample: int
    #: significant bits per sample (12 for a 12-bit TIFF in 16-bit words)
    bits: int = 8
    #: a JPEG the GPU's decoders take as it is (``jpeg.JpegLayout.gpu_decodable``)
    gpu_decodable: bool = False

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def decoded_bytes(self, reduce: int = 1) -> int:
        """Bytes the decode allocates at its peak: the decoder's array, its 8-bit copy when it is
        deeper, and the BGR image compositing makes when it is not BGR already."""
        pixels = -(-self.height // reduce) * -(-self.width // reduce)
        total = pixels * self.channels * self.bytes_per_sample
        if self.bytes_per_sample > 1:
            total += pixels * self.channels
        if self.channels != 3:
            total += pixels * 3
        return total


def _jpeg_info(data: bytes) -> ImageInfo:
    frame = jpeg.layout(data)
    return ImageInfo("jpeg", frame.height, frame.width, 3, 1, frame.bits, frame.gpu_decodable)


def _png_info(data: bytes) -> ImageInfo:
    if len(data) < 29 or data[12:16] != b"IHDR":
        raise DecodeError("PNG header is truncated or corrupt")
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(color_type)
    if not (width and height) or channels is None or depth not in (1, 2, 4, 8, 16):
        raise DecodeError(f"PNG header is invalid ({width}x{height}, colour type {color_type}, depth {depth})")
    return ImageInfo("png", height, width, channels, 2 if depth == 16 else 1, max(depth, 8))


def _pillow_info(data: bytes) -> ImageInfo:
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            width, height = image.size
            mode, fmt = image.mode, (image.format or "?").lower()
            bits = _significant_bits(image)
    except UnidentifiedImageError:
        raise DecodeError(
            "bytes are not an image of an accepted format (JPEG, PNG, WebP, TIFF, BMP, GIF, PPM, TGA)"
        ) from None
    except Exception as exc:  # Pillow's header parsers raise SyntaxError, struct.error, OSError...
        raise DecodeError(f"image header is corrupt: {exc}") from None
    channels, sample = _PILLOW_MODES.get(mode, (4, 1))
    if not (width and height):
        raise DecodeError(f"image has no pixels ({width}x{height})")
    return ImageInfo(fmt, height, width, channels, sample, bits)


def _significant_bits(image: Image.Image) -> int:
    tags = getattr(image, "tag_v2", None)  # TIFF: BitsPerSample
    if tags is not None and 258 in tags:
        value = tags[258]
        bits = value[0] if isinstance(value, tuple) else value
        return int(bits)
    return 16 if image.mode.startswith("I;16") else 8


def probe(data: bytes) -> ImageInfo:
    """Format, dimensions and sample size from the header alone; DecodeError if there is no image."""
    if data.startswith(JPEG_SOI):
        return _jpeg_info(data)
    if data.startswith(PNG_SIGNATURE):
        return _png_info(data)
    return _pillow_info(data)


class ByteBudget:
    """Decoded bytes that concurrent decodes may hold together; a decode waits for its share."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + nbytes <= self.capacity)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


def _jpeg_truncated(data: bytes) -> bool:
    """True when the last scan has no end-of-image marker after it (entropy data never holds FFD9)."""
    if data.endswith(b"\xff\xd9"):  # nearly every JPEG: no need to scan it
        return False
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0


def _composite_on_white(image: ImageU8) -> ImageU8:
    """Colour channels blended over white by the last (alpha) channel: round(c * a / 255) + 255 - a,
    in OpenCV's 8-bit arithmetic, row chunk by row chunk (exact: c * a / 255 is never a half).
    Opaque chunks keep their colours as they are: most RGBA images have no transparency at all, and
    the blend was a third of preparing a 13-megapixel one."""
    height, width, channels = image.shape
    out = np.empty((height, width, channels - 1), np.uint8)
    rows = max(1, _CHUNK_PIXELS // width)
    for top in range(0, height, rows):
        chunk, target = image[top : top + rows], out[top : top + rows]
        alpha = cv2.extractChannel(chunk, channels - 1)
        if cv2.minMaxLoc(alpha)[0] == 255:  # OpenCV's copies: a numpy slice copy is ten times slower
            opaque = cv2.cvtColor(chunk, cv2.COLOR_BGRA2BGR) if channels == 4 else cv2.extractChannel(chunk, 0)
            target[:] = opaque.reshape(target.shape)
            continue
        white = cv2.bitwise_not(alpha)  # 255 - a: how much of the white background shows
        blended = [cv2.add(cv2.multiply(color, alpha, scale=1 / 255), white) for color in cv2.split(chunk)[:-1]]
        target[:] = cv2.merge(blended) if len(blended) > 1 else blended[0][..., None]
    return out[..., 0] if channels == 2 else out


def _to_8bit(decoded: npt.NDArray[Any], bits: int) -> ImageU8:
    if decoded.dtype == np.uint8:
        return decoded
    out = np.empty(decoded.shape, np.uint8)
    flat_in, flat_out = decoded.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _CHUNK_PIXELS):
        part = flat_in[start : start + _CHUNK_PIXELS]
        if decoded.dtype.kind == "f":
            flat_out[start : start + _CHUNK_PIXELS] = np.clip(part * 255.0, 0, 255)
        else:
            shift = max(min(bits, decoded.dtype.itemsize * 8) - 8, 0)
            flat_out[start : start + _CHUNK_PIXELS] = np.clip(part >> shift, 0, 255)
    return out


def to_bgr8(decoded: npt.NDArray[Any], bits: int = 16) -> ImageU8:
    """Any decoded layout (gray, gray+alpha, BGRA, 16-bit, float) as 3-channel 8-bit BGR."""
    image = _to_8bit(decoded, bits if decoded.dtype != np.uint8 else 8)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels in (2, 4):
        image = _composite_on_white(image if image.ndim == 3 else image[..., None])
        channels -= 1
    if channels == 1:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    return image


def _decode_with_pillow(data: bytes, info: ImageInfo) -> ImageU8:
    """Formats OpenCV refuses (12-bit TIFF, CMYK TIFF, some GIFs): Pillow, first frame."""
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            image.seek(0)
            if image.mode.startswith("I;16") or image.mode in ("I", "F"):
                array = np.asarray(image)
                if image.mode == "I":
                    array = np.clip(array, 0, 65535).astype(np.uint16)
                return to_bgr8(array, info.bits if image.mode != "F" else 16)
            rgba = "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
            converted = image.convert("RGBA" if rgba else "RGB")
            array = np.asarray(converted)
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError...
        raise DecodeError(f"image could not be decoded ({info.format}): {exc}") from None
    return to_bgr8(cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR))


def decode(data: bytes, info: ImageInfo, reduce: int = 1) -> ImageU8:
    """Upright 8-bit BGR (EXIF orientation applied for JPEG); JPEG optionally at 1/2, 1/4 or 1/8 scale."""
    if info.format == "jpeg":
        if _jpeg_truncated(data):
            raise DecodeError("JPEG is truncated (no end-of-image marker after the last scan)")
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}.get(
            reduce, cv2.IMREAD_REDUCED_COLOR_8
        )
    else:  # keep alpha and depth; composited and scaled to 8 bits below
        flag = cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        if info.format == "jpeg":  # Pillow's JPEG decoder is the same libjpeg: nothing to fall back to
            raise DecodeError("JPEG could not be decoded (corrupt data or an unsupported variant)")
        return _decode_with_pillow(data, info)
    return to_bgr8(image)  # OpenCV scales every integer depth to its full 8 or 16 bits


@dataclass(frozen=True)
class Prepared:
    """One image ready for batching: uint8 BGR at its input size (or, for the GPU to decode, a JPEG
    already at its input size, still compressed), its padded shape, how to map back."""

    image: ImageU8 | None
    bucket: BucketSpec
    original_height: int
    original_width: int
    padded_height: int
    padded_width: int
    #: time spent decoding and resizing on a decode thread
    decode_s: float = 0.0
    #: the JPEG itself, when the engine's device decodes it (``image`` is then None)
    compressed: bytes | None = None
    #: what the header said it is (jpeg, png, webp...)
    format: str = ""

    @property
    def pixels(self) -> ImageU8:
        """The decoded image, for callers that never ask the device to decode."""
        if self.image is None:
            raise InternalError("this image is left for the device to decode")
        return self.image

    @property
    def slot(self) -> ImageU8 | tuple[int, int]:
        """What a batch slot gets: the pixels, or the size the device decodes the JPEG to."""
        return (self.height, self.width) if self.image is None else self.image

    @property
    def height(self) -> int:
        return self.original_height if self.image is None else int(self.image.shape[0])

    @property
    def width(self) -> int:
        return self.original_width if self.image is None else int(self.image.shape[1])


@dataclass(frozen=True)
class Limits:
    max_pixels: int
    #: the largest decoded size one image may have; decodes beyond the budget's capacity wait forever
    max_decoded_bytes: int


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


def reduction(info: ImageInfo, target_h: int, target_w: int) -> int:
    """The largest JPEG scale-down (2, 4, 8) that still leaves at least the target size (no upsampling)."""
    if info.format != "jpeg":
        return 1
    for factor in (8, 4, 2):
        if info.height // factor >= target_h and info.width // factor >= target_w:
            return factor
    return 1


def _padded(bucket: BucketSpec, height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    grid = spec.preprocess.resize.pad_multiple
    return min(-(-height // grid) * grid, bucket.max[1]), min(-(-width // grid) * grid, bucket.max[2])


def _for_the_device(data: bytes, info: ImageInfo, spec: ModelSpec, started: float) -> Prepared | None:
    """The JPEG as it is, when the device decodes it to exactly its input size: no resize, no
    rotation, a layout its decoders take, nothing cut short, and no bigger than its pixels (it
    travels in their place)."""
    if not info.gpu_decodable or _jpeg_truncated(data):
        return None
    bucket, h, w = route(info.height, info.width, spec)
    padded_h, padded_w = _padded(bucket, h, w, spec)
    if (h, w) != (info.height, info.width) or len(data) > padded_h * padded_w * 3:
        return None
    elapsed = time.perf_counter() - started
    return Prepared(None, bucket, h, w, padded_h, padded_w, elapsed, compressed=data, format=info.format)


def prepare(
    data: bytes, spec: ModelSpec, limits: Limits, budget: ByteBudget, device_decodes_jpeg: bool = False
) -> Prepared:
    """Probe, check, decode within the budget, resize and route one image; with
    ``device_decodes_jpeg``, a JPEG the device can decode at its input size is left compressed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("image is empty (0 bytes)")
    data = bytes(data)
    started = time.perf_counter()
    info = probe(data)
    if info.pixels > limits.max_pixels:
        raise ImageTooLargeError(f"image is {info.width}x{info.height} pixels, the limit is {limits.max_pixels}")
    if device_decodes_jpeg and (compressed := _for_the_device(data, info, spec, started)) is not None:
        return compressed
    # Header dimensions choose the JPEG scale; EXIF may swap them, which swaps the target alike.
    _, header_h, header_w = route(info.height, info.width, spec)
    reduce = reduction(info, header_h, header_w)
    needed = info.decoded_bytes(reduce) * (1 if info.format in ("jpeg", "png") else 2)  # Pillow copies once
    if needed > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            f"a {info.width}x{info.height} {info.format} image with {info.channels} channels of "
            f"{8 * info.bytes_per_sample} bits decodes to {needed} bytes, the limit is {limits.max_decoded_bytes}"
        )
    with budget.hold(needed):
        image = decode(data, info, reduce)
        if (reduce == 1 and image.shape[:2] == (info.height, info.width)) or (
            reduce > 1 and image.shape[:2] == (-(-info.height // reduce), -(-info.width // reduce))
        ):
            original_h, original_w = info.height, info.width
        else:  # EXIF orientation turned it by 90 degrees
            original_h, original_w = info.width, info.height
        bucket, h, w = route(original_h, original_w, spec)
        if image.shape[:2] != (h, w):
            image = np.asarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
        image = np.ascontiguousarray(image)
    padded_h, padded_w = _padded(bucket, h, w, spec)
    elapsed = time.perf_counter() - started
    return Prepared(image, bucket, original_h, original_w, padded_h, padded_w, elapsed, format=info.format)


def assemble(out: ImageU8, images: Sequence[ImageU8 | tuple[int, int]], pad_value: tuple[int, int, int]) -> float:
    """Write images into an [N,H,W,3] buffer (padding right and below each); returns the padding
    share. A (height, width) in place of an image is a slot the device decodes into: left alone."""
    _, height, width, _ = out.shape
    valid = 0
    for i, image in enumerate(images):
        if isinstance(image, tuple):
            valid += image[0] * image[1]
            continue
        h, w = image.shape[:2]
        out[i, :h, :w] = image
        if w < width:
            out[i, :h, w:] = pad_value
        if h < height:
            out[i, h:] = pad_value
        valid += h * w
    return 1.0 - valid / float(len(images) * height * width)
