"""The JPEG header against OpenCV on real files, and which JPEGs are left for the device to decode."""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.compute import jpeg
from worker.compute.imaging import ByteBudget, Limits, prepare
from worker.core.buckets import ModelSpec
from worker.core.errors import DecodeError

LIMITS = Limits(40_000_000, 1 << 30)


def _jpegs(photos: list[Path], edge_dir: Path) -> list[Path]:
    return [p for p in [*photos, *sorted(edge_dir.iterdir())] if p.suffix.lower() in (".jpg", ".jpeg")]


def _encode(image: np.ndarray, *options: int) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, *options])[1].tobytes()


def _unknown_component(data: bytes) -> bytes:
    """The first scan names component 0x77, which the frame does not have: libjpeg refuses the
    image, a GPU decoder may decode it anyway, so the header sends it to the CPU."""
    at = data.index(b"\xff\xda") + 5
    return data[:at] + b"\x77" + data[at + 1 :]


def _photo(photos: list[Path], size: tuple[int, int] = (512, 384)) -> np.ndarray:
    return cv2.resize(cv2.imread(str(next(p for p in photos if p.suffix == ".jpg"))), size)


def test_the_header_gives_opencvs_dimensions_on_every_real_jpeg(photos: list[Path], edge_dir: Path) -> None:
    checked = 0
    for path in _jpegs(photos, edge_dir):
        data = path.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        if decoded is None:  # the broken edge cases: the header parses, or says why not, never crashes
            with contextlib.suppress(DecodeError):
                jpeg.layout(data)
            continue
        frame = jpeg.layout(data)
        assert (frame.height, frame.width) == decoded.shape[:2], path.name
        assert (len(frame.sampling) == 1) == (decoded.ndim == 2), path.name  # grey, or colour (CMYK as BGR)
        checked += 1
    assert checked >= 40, checked


def test_what_the_gpu_decodes_and_what_stays_on_the_cpu(photos: list[Path], edge_dir: Path) -> None:
    image = _photo(photos)
    layouts = {
        "4:2:0": jpeg.layout(_encode(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)),
        "4:2:2": jpeg.layout(_encode(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422)),
        "4:4:4": jpeg.layout(_encode(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)),
        "4:1:1": jpeg.layout(_encode(image, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411)),
        "progressive": jpeg.layout(_encode(image, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
        "a scan of a component the frame lacks": jpeg.layout(_unknown_component(_encode(image))),
        "gray": jpeg.layout((edge_dir / "hopper_gray.jpg").read_bytes()),
        "cmyk": jpeg.layout((edge_dir / "pil_sample_cmyk.jpg").read_bytes()),
        **{f"exif {n}": jpeg.layout((edge_dir / f"hopper_orientation_{n}.jpg").read_bytes()) for n in range(2, 9)},
    }
    decodable = {name for name, frame in layouts.items() if frame.gpu_decodable}
    assert decodable == {"4:2:0", "4:2:2", "4:4:4", "gray"}, decodable
    assert layouts["progressive"].sof == 0xC2 and layouts["4:1:1"].sampling[0] == (4, 1)
    assert [layouts[f"exif {n}"].orientation for n in range(2, 9)] == list(range(2, 9))


def test_a_jpeg_at_its_input_size_is_left_compressed_and_the_rest_decode_here(
    spec: ModelSpec, photos: list[Path], edge_dir: Path
) -> None:
    budget = ByteBudget(1 << 30)
    fits = _encode(_photo(photos))  # 512x384: a multiple of 32, under the longer-side cap
    left = prepare(fits, spec, LIMITS, budget, device_decodes_jpeg=True)
    assert left.image is None and left.compressed == fits and (left.height, left.width) == (384, 512)
    assert left.slot == (384, 512) and left.format == "jpeg"
    assert prepare(fits, spec, LIMITS, budget).image is not None  # without a decoding device: as before

    others = {
        "needs resizing": _encode(_photo(photos, (500, 375))),
        "progressive": _encode(_photo(photos), cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "rotated by EXIF": (edge_dir / "hopper_orientation_6.jpg").read_bytes(),
        "cut short": fits[: len(fits) // 2],
    }
    for name, data in others.items():
        try:
            prepared = prepare(data, spec, LIMITS, budget, device_decodes_jpeg=True)
        except DecodeError:
            assert name == "cut short"  # the same clear decode_error as without the device
            continue
        assert prepared.compressed is None and prepared.image is not None, name


def test_a_cut_short_jpeg_gets_the_cpu_paths_error(spec: ModelSpec, edge_dir: Path) -> None:
    data = (edge_dir / "truncated_jpeg.jpg").read_bytes()
    with pytest.raises(DecodeError, match="truncated"):
        prepare(data, spec, LIMITS, ByteBudget(1 << 30), device_decodes_jpeg=True)
