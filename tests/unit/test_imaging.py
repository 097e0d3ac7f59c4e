from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from worker.compute.imaging import (
    ByteBudget,
    Limits,
    _decode_with_pillow,
    assemble,
    decode,
    prepare,
    probe,
    reduction,
    route,
    to_bgr8,
)
from worker.core.buckets import ModelSpec
from worker.core.errors import DecodeError, ImageTooLargeError

LIMITS = Limits(max_pixels=40_000_000, max_decoded_bytes=512 << 20)


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def _pillow(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _png_header_only(width: int, height: int, depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def _jpeg_with_dims(data: bytes, height: int, width: int) -> bytes:
    """A real JPEG whose frame header claims other dimensions (a classic decompression bomb)."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def _prepare(data: bytes, spec: ModelSpec, limits: Limits = LIMITS) -> object:
    return prepare(data, spec, limits, ByteBudget(limits.max_decoded_bytes))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM"])
def test_probe_reads_every_format_header_without_decoding(fmt: str) -> None:
    data = _pillow(Image.new("RGB", (53, 37), (10, 200, 30)), fmt)
    info = probe(data)
    assert (info.height, info.width) == (37, 53), fmt


def test_jpeg_frame_header_far_into_the_file_is_found() -> None:
    """A 100 KiB APP segment before the frame header: the whole header is read, not the first 64 KiB."""
    data = _encode(np.zeros((40, 60, 3), np.uint8), ".jpg")
    padding = b"\xff\xe5" + struct.pack(">H", 65535) + bytes(65533)
    bloated = data[:2] + padding + padding + data[2:]
    assert len(bloated) > 130_000
    assert (probe(bloated).height, probe(bloated).width) == (40, 60)
    with pytest.raises(ImageTooLargeError, match="60000x50000"):
        _prepare(_jpeg_with_dims(bloated, 50_000, 60_000), _spec_any())


def _spec_any() -> ModelSpec:
    from worker.core.buckets import load_model_spec
    from worker.core.settings import DEFAULT_SPEC

    return load_model_spec(DEFAULT_SPEC)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("png", _png_header_only(100_000, 100_000)),
        ("jpeg", _jpeg_with_dims(_encode(np.zeros((8, 8, 3), np.uint8), ".jpg"), 40_000, 40_000)),
        ("webp", _patched(_pillow(Image.new("RGB", (16, 16)), "WEBP"), 26, struct.pack("<HH", 16383, 16383))),
        ("bmp", _patched(_pillow(Image.new("RGB", (4, 4)), "BMP"), 18, struct.pack("<ii", 30000, 30000))),
        ("gif", _patched(_pillow(Image.new("RGB", (4, 4)), "GIF"), 6, struct.pack("<HH", 65535, 65535))),
    ],
)
def test_decompression_bombs_are_refused_from_their_header(name: str, data: bytes) -> None:
    with pytest.raises((ImageTooLargeError, DecodeError)) as info:
        _prepare(data, _spec_any())
    assert info.type is ImageTooLargeError, (name, info.value)


def test_decoded_size_limit_counts_depth_and_alpha() -> None:
    """2000x2000 RGBA at 16 bits: few pixels, 32 MB decoded, over a 16 MiB limit before any decode."""
    data = _png_header_only(2000, 2000, depth=16, color_type=6)
    with pytest.raises(ImageTooLargeError, match="decodes to"):
        _prepare(data, _spec_any(), Limits(40_000_000, 16 << 20))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"plain text, not an image\n", "accepted format"),
        (np.random.default_rng(1).bytes(4096), "accepted format"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "accepted format"),
    ],
)
def test_undecodable_bytes_raise_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        _prepare(data, _spec_any())


def test_truncated_jpeg_is_an_error_not_a_half_grey_image(photos: list[Path], spec: ModelSpec) -> None:
    data = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    with pytest.raises(DecodeError, match="truncated"):
        _prepare(data[: len(data) // 2], spec)
    assert decode(data, probe(data)).ndim == 3


def test_pixel_limit_applies_to_every_image(spec: ModelSpec) -> None:
    with pytest.raises(ImageTooLargeError):
        _prepare(_encode(np.zeros((100, 100, 3), np.uint8), ".png"), spec, Limits(9_999, 1 << 20))


def test_layouts_become_three_channel_uint8_bgr() -> None:
    gray = np.full((10, 12), 200, np.uint8)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 255  # red, fully transparent: composited on white
    half = np.zeros((10, 12, 4), np.uint8)
    half[..., 3] = 128  # black at half opacity: mid grey
    sixteen = np.full((10, 12, 3), 65535, np.uint16)
    for image, expected in [(gray, 200), (rgba, 255), (half, 127), (sixteen, 255)]:
        data = _encode(image, ".png")
        decoded = decode(data, probe(data))
        assert decoded.shape == (10, 12, 3) and decoded.dtype == np.uint8
        assert int(decoded.min()) == expected


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The compositing rule in integers: colour times alpha plus white times the rest, rounded."""
    c, a = color.astype(np.int64), alpha.astype(np.int64)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def test_compositing_is_exact_for_every_colour_and_alpha() -> None:
    """Every (colour, alpha) pair, with one colour channel and with three."""
    color, alpha = (grid.astype(np.uint8) for grid in np.meshgrid(np.arange(256), np.arange(256)))
    expected = _over_white(color, alpha)
    assert np.array_equal(to_bgr8(np.dstack([color, alpha])), cv2.cvtColor(expected, cv2.COLOR_GRAY2BGR))
    assert np.array_equal(
        to_bgr8(np.dstack([color, 255 - color, color // 2, alpha])),
        np.dstack([expected, _over_white(255 - color, alpha), _over_white(color // 2, alpha)]),
    )


def test_compositing_runs_in_bounded_chunks() -> None:
    """A tall RGBA image is composited chunk by chunk, with the same result as one pass."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (3000, 700, 4), dtype=np.uint8)
    assert np.array_equal(to_bgr8(image), _over_white(image[..., :3], image[..., 3:]))


def test_opaque_rows_keep_their_colours_beside_transparent_ones() -> None:
    """Chunks with no transparency skip the blend; a chunk with one transparent pixel does not."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (3000, 700, 4), dtype=np.uint8)
    image[..., 3] = 255
    image[2500, 3, 3] = 0  # one transparent pixel in the last chunk
    composited = to_bgr8(image)
    assert np.array_equal(composited[:2000], image[:2000, :, :3])
    assert np.array_equal(composited, _over_white(image[..., :3], image[..., 3:]))
    assert composited[2500, 3].tolist() == [255, 255, 255]
    gray_alpha = np.dstack([image[..., 0], image[..., 3]])
    assert np.array_equal(to_bgr8(gray_alpha)[..., 0], _over_white(image[..., 0], image[..., 3]))


def test_twelve_bit_samples_scale_by_their_real_depth(edge_dir: Path) -> None:
    """12-bit TIFF, through OpenCV and through the Pillow fallback alike: 4095 is white."""
    twelve = (edge_dir / "12bit.cropped.tif").read_bytes()
    info = probe(twelve)
    assert info.bits == 12
    reference = np.asarray(Image.open(io.BytesIO(twelve))).astype(np.float64) / 4095 * 255
    for decoded in (decode(twelve, info), _decode_with_pillow(twelve, info)):
        assert decoded.shape[:2] == reference.shape
        assert np.abs(decoded[..., 0].astype(np.float64) - reference).max() <= 1


def test_images_opencv_refuses_decode_through_pillow(edge_dir: Path) -> None:
    data = (edge_dir / "bmp-b-badrle.bmp").read_bytes()  # RLE data OpenCV rejects, Pillow reads
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
    image = decode(data, probe(data))
    assert image.shape == (64, 127, 3)


@pytest.mark.parametrize(
    "name",
    [
        "hopper.webp",
        "transparent.webp",
        "hopper.gif",
        "hopper.bmp",
        "hopper.tif",
        "hopper_16bit.pgm",
        "tiff_strip_cmyk_jpeg.tif",
        "iss634.apng",
    ],
)
def test_accepted_formats_decode(edge_dir: Path, name: str) -> None:
    data = (edge_dir / name).read_bytes()
    image = decode(data, probe(data))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.size


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied(edge_dir: Path, orientation: int) -> None:
    """Pillow's hopper_orientation_N.jpg store the same picture transformed; upright they match hopper.jpg."""
    upright_data = (edge_dir / "hopper.jpg").read_bytes()
    upright = decode(upright_data, probe(upright_data)).astype(np.float32)
    data = (edge_dir / f"hopper_orientation_{orientation}.jpg").read_bytes()
    rotated = decode(data, probe(data)).astype(np.float32)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.abs(rotated - upright).mean() < 12  # JPEG noise only
    assert np.abs(raw.astype(np.float32) - upright).mean() > 20  # without orientation it would not match


def test_large_jpegs_decode_at_reduced_scale_to_the_same_input(photos: list[Path], spec: ModelSpec) -> None:
    """A 2000-px JPEG decodes at 1/2 scale: same bucket, size and original dimensions as full decode."""
    source = cv2.imread(str(next(p for p in photos if p.name.endswith("scenetext01.jpg"))))
    big = _encode(cv2.resize(source, (2000, 1500)), ".jpg")
    info = probe(big)
    _, h, w = route(info.height, info.width, spec)
    assert reduction(info, h, w) == 2
    prepared = _prepare(big, spec)
    assert (prepared.original_height, prepared.original_width) == (1500, 2000)
    assert prepared.image.shape == (h, w, 3)
    full = cv2.resize(decode(big, info), (w, h), interpolation=cv2.INTER_AREA)
    assert np.abs(prepared.image.astype(np.float32) - full).mean() < 4


def test_prepare_keeps_uint8_pixels_resizes_and_routes(spec: ModelSpec) -> None:
    image = np.zeros((600, 800, 3), np.uint8)
    image[:, :, 2] = 255  # red in BGR
    prepared = _prepare(_encode(image, ".png"), spec)
    assert prepared.image.shape == (608, 800, 3) and prepared.image.dtype == np.uint8
    assert (prepared.original_height, prepared.original_width) == (600, 800)
    assert prepared.bucket.id == "l640x960"
    assert prepared.image[300, 400].tolist() == [0, 0, 255]  # channel order untouched: BGR
    assert (prepared.padded_height, prepared.padded_width) == (640, 896)


def test_assemble_pads_right_and_below_with_the_mean_and_reports_waste(spec: ModelSpec) -> None:
    a = np.full((64, 64, 3), 7, np.uint8)
    b = np.full((32, 128, 3), 9, np.uint8)
    pad = spec.preprocess.pad_value()
    assert pad == (128, 128, 128)  # mean 0.5 of 255
    out = np.zeros((2, 128, 128, 3), np.uint8)
    waste = assemble(out, [a, b], pad)
    assert (out[0, :64, :64] == 7).all() and (out[0, :, 64:] == 128).all() and (out[0, 64:] == 128).all()
    assert (out[1, :32] == 9).all() and (out[1, 32:] == 128).all()
    assert waste == pytest.approx(1 - (64 * 64 + 32 * 128) / (2 * 128 * 128))


def test_byte_budget_bounds_concurrent_holds() -> None:
    budget = ByteBudget(100)
    peak = 0
    lock = threading.Lock()

    def use(nbytes: int) -> None:
        nonlocal peak
        with budget.hold(nbytes):
            with lock:
                peak = max(peak, budget.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=use, args=(n,)) for n in [60, 60, 30, 30, 500, 10] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak <= 100 and budget.used == 0  # 500 asks for more than there is: it gets all of it, alone
