from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.buckets import ModelSpec
from worker.errors import DecodeError, ImageTooLargeError
from worker.imaging import decode_image, header_size, normalize, pad_batch, prepare

LIMIT = 40_000_000


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_header_size_reads_dimensions_without_decoding(ext: str) -> None:
    data = _encode(np.zeros((37, 53, 3), np.uint8), ext)
    assert header_size(data) == (37, 53)


def test_decompression_bomb_is_rejected_from_its_header() -> None:
    with pytest.raises(ImageTooLargeError, match="100000x100000"):
        decode_image(_png_header_only(100_000, 100_000), LIMIT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"plain text, not an image\n", "not a decodable image"),
        (np.random.default_rng(1).bytes(4096), "not a decodable image"),
    ],
)
def test_undecodable_bytes_raise_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_image(data, LIMIT)


def test_truncated_jpeg_is_an_error_not_a_half_grey_image(photos: list[Path]) -> None:
    data = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], LIMIT)
    assert decode_image(data, LIMIT).ndim == 3


def test_pixel_limit_applies_to_every_image() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(_encode(np.zeros((100, 100, 3), np.uint8), ".png"), 9_999)


def test_layouts_become_three_channel_uint8_bgr() -> None:
    gray = np.full((10, 12), 200, np.uint8)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 255  # red, fully transparent: composited on white
    sixteen = np.full((10, 12, 3), 65535, np.uint16)
    for image, expected in [(gray, 200), (rgba, 255), (sixteen, 255)]:
        decoded = decode_image(_encode(image, ".png"), LIMIT)
        assert decoded.shape == (10, 12, 3) and decoded.dtype == np.uint8
        assert int(decoded.min()) == expected


def test_palette_and_transparency_pngs_from_pillow_decode(edge_dir: Path) -> None:
    for name in [
        "p_trns_single.png",
        "1_trns.png",
        "uncompressed_la.png",
        "pil123rgba.png",
        "tiff_16bit_RGB_target.png",
    ]:
        decoded = decode_image((edge_dir / name).read_bytes(), LIMIT)
        assert decoded.ndim == 3 and decoded.shape[2] == 3 and decoded.dtype == np.uint8, name


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied(edge_dir: Path, orientation: int) -> None:
    """Pillow's hopper_orientation_N.jpg store the same picture transformed; upright they match hopper.jpg."""
    upright = decode_image((edge_dir / "hopper.jpg").read_bytes(), LIMIT).astype(np.float32)
    rotated = decode_image((edge_dir / f"hopper_orientation_{orientation}.jpg").read_bytes(), LIMIT).astype(np.float32)
    raw = cv2.imdecode(
        np.frombuffer((edge_dir / f"hopper_orientation_{orientation}.jpg").read_bytes(), np.uint8),
        cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    ).astype(np.float32)
    assert np.abs(rotated - upright).mean() < 12  # JPEG noise only
    assert np.abs(raw - upright).mean() > 20  # without orientation it would not match


def test_prepare_normalises_resizes_and_routes(spec: ModelSpec) -> None:
    image = np.full((600, 800, 3), 255, np.uint8)
    prepared = prepare(_encode(image, ".png"), spec, LIMIT)
    assert prepared.tensor.shape == (3, 608, 800) and prepared.tensor.dtype == np.float32
    assert (prepared.original_height, prepared.original_width) == (600, 800)
    assert prepared.bucket.id == "l640x960"
    np.testing.assert_allclose(prepared.tensor, 1.0, atol=1e-6)  # (255/255 - 0.5) / 0.5
    np.testing.assert_allclose(normalize(np.zeros((2, 2, 3), np.uint8), spec), -1.0)


def test_padded_shape_depends_on_the_image_alone(spec: ModelSpec) -> None:
    """The shipped spec pads to a 128 grid, capped at the bucket's max."""
    small = prepare(_encode(np.zeros((64, 64, 3), np.uint8), ".png"), spec, LIMIT)
    wide = prepare(_encode(np.zeros((600, 800, 3), np.uint8), ".png"), spec, LIMIT)
    assert (small.padded_height, small.padded_width) == (128, 128)
    assert (wide.height, wide.width, wide.padded_height, wide.padded_width) == (608, 800, 640, 896)


def test_pad_batch_pads_bottom_right_and_reports_waste(spec: ModelSpec) -> None:
    a = prepare(_encode(np.zeros((64, 64, 3), np.uint8), ".png"), spec, LIMIT)
    b = prepare(_encode(np.zeros((32, 128, 3), np.uint8), ".png"), spec, LIMIT)
    batch, waste = pad_batch([a, b])
    assert batch.shape == (2, 3, 128, 128)
    np.testing.assert_array_equal(batch[0, :, :64, :64], a.tensor)
    assert float(np.abs(batch[0, :, :, 64:]).max()) == 0.0
    assert float(np.abs(batch[1, :, 32:, :]).max()) == 0.0
    assert waste == pytest.approx(1 - (64 * 64 + 32 * 128) / (2 * 128 * 128))
    c = prepare(_encode(np.zeros((600, 800, 3), np.uint8), ".png"), spec, LIMIT)
    with pytest.raises(ValueError, match="one padded shape"):
        pad_batch([a, c])
