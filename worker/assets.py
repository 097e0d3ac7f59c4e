"""``fetch-assets``: the real model and photos, downloaded by package name, checked by sha256, cached.

Nothing fetched here is committed; everything lands under ``Settings.assets_dir``:
``models/`` (the ONNX file and the fake backend's recorded map), ``demo/`` (photos with text in
them, what the demo and the images serve) and, for the tests only, ``photos/`` (every real photo)
and ``edge/`` (decoder edge cases and hostile files).

The demo takes its photos from two wheels on PyPI (~29 MB) and Debian 12's ``opencv-doc`` package
(~92 MB, through apt): where apt cannot get that package, the demo says so and keeps the one text
photo of the wheels. The test material adds Pillow's source archive (~45 MB).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: photos are taken in the formats producers send most
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


@dataclass(frozen=True)
class Package:
    """One pinned download: how to get it, the sha256 of the file, its size for progress lines."""

    kind: str  # "wheel" | "sdist" | "deb"
    spec: str  # name==version (pip) or name=version (apt)
    filename: str
    sha256: str
    mib: int


RAPIDOCR = Package(
    "wheel",
    "rapidocr-onnxruntime==1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    15,
)
SCIKIT_IMAGE = Package(
    "wheel",
    "scikit-image==0.26.0",
    "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    14,
)
OPENCV_DOC = Package(
    "deb",
    "opencv-doc=4.6.0+dfsg-12",
    "opencv-doc_4.6.0+dfsg-12_all.deb",
    "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
    92,
)
PILLOW_SDIST = Package(
    "sdist",
    "pillow==13.0.0",
    "pillow-13.0.0.tar.gz",
    "cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510",
    45,
)

MODEL_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
#: the real photo the fake backend's probability map is recorded from (scanned text: many boxes)
RECORDING_PHOTO = "skimage-page.png"
#: the demo's photos: signs, printed pages and puzzles, each with text the detector finds
DEMO_OPENCV_PHOTOS = (
    *(f"text/scenetext0{n}.jpg" for n in range(1, 7)),
    "data/imageTextN.png",
    "data/imageTextR.png",
    "data/sudoku.png",
    "data/messi5.jpg",
    "data/box.png",
    "ximgproc/stanford.png",
)
OPENCV_PHOTO_DIRS = ("data", "text", "hfs/data", "fuzzy", "ximgproc", "reg")
#: Pillow's test images the tests use: formats, layouts, and files built to break decoders
EDGE_CASES = (
    "hopper.jpg",
    "hopper.png",
    "hopper_gray.jpg",
    "pil_sample_cmyk.jpg",
    "junk_jpeg_header.jpg",
    "truncated_jpeg.jpg",
    "truncated_image.png",
    "tiff_16bit_RGB_target.png",
    "tiff_16bit_RGBa_target.png",
    "pil123rgba.png",
    "uncompressed_la.png",
    "p_trns_single.png",
    "1_trns.png",
    "tRNS_null_1x1.png",
    *(f"hopper_orientation_{n}.jpg" for n in range(2, 9)),
    "hopper.webp",
    "transparent.webp",
    "iss634.webp",
    "hopper.gif",
    "iss634.gif",
    "hopper.bmp",
    "hopper.tif",
    "hopper.ppm",
    "hopper_16bit.pgm",
    "12bit.cropped.tif",
    "16bit.cropped.tif",
    "tiff_strip_cmyk_jpeg.tif",
    "iss634.apng",
    *(
        f"bmp/b/{name}.bmp"
        for name in (
            "badbitcount",
            "badbitssize",
            "baddens1",
            "badfilesize",
            "badheadersize",
            "badpalettesize",
            "badplanes",
            "badrle",
            "badwidth",
            "pal8badindex",
            "reallybig",
            "rletopdown",
            "shortfile",
        )
    ),
    "broken.png",
    "broken_data_stream.png",
    "truncated_end_chunk.png",
    "png_decompression_dos.png",
    "decompression_bomb.gif",
    "decompression_bomb_extents.gif",
    "decompression_bomb.ico",
    "negative_size.ppm",
    "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif",
    "truncated_app14.jpg",
    "photoshop-200dpi-broken.jpg",
    "sugarshack_bad_mpo_header.jpg",
    "crash-465703f71a0f0094873a3e0e82c9f798161171b8.sgi",
    "crash-4fb027452e6988530aa5dabee76eecacb3b79f8a.j2k",
    "eps/pil_sample_cmyk.eps",
    "cross_scan_line_truncated.tga",
    "invalid_header_length.jp2",
)


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    logger.debug("running %s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _download(package: Package, into: Path) -> Path:
    target = into / package.filename
    if target.is_file() and sha256_of(target) == package.sha256:
        return target
    into.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (%d MiB)...", package.spec, package.mib)
    started = time.monotonic()
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into)]
    if package.kind == "wheel":
        # the same file whatever Python and machine run this: pin the tags of the wheel recorded above
        tags = ["--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
        _run([*pip, "--only-binary=:all:", *tags, package.spec], into)
    elif package.kind == "sdist":
        _run([*pip, "--no-binary=:all:", package.spec], into)
    else:
        try:
            _run(["apt-get", "download", package.spec], into)
        except subprocess.CalledProcessError:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-qq"], into)
            _run(["apt-get", "download", package.spec], into)
    actual = sha256_of(target)
    if actual != package.sha256:
        target.unlink()
        raise RuntimeError(f"{package.filename}: sha256 {actual} is not the pinned {package.sha256}")
    logger.info("downloaded %s in %.0f s", package.filename, time.monotonic() - started)
    return target


def _copy_images(source: Path, into: Path, prefix: str) -> int:
    into.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
            shutil.copyfile(path, into / f"{prefix}{path.name}")
            count += 1
    return count


def _record_fake_map(model_file: Path, photo: Path) -> None:
    from worker.backends.fake import record_probability_map, recorded_map_path
    from worker.core.buckets import load_model_spec
    from worker.core.settings import DEFAULT_SPEC

    if not recorded_map_path(model_file).is_file():
        logger.info("recording the fake backend's probability map from %s", photo.name)
        record_probability_map(load_model_spec(DEFAULT_SPEC), model_file, photo.read_bytes())


def _opencv_examples(downloads: Path, into: Path) -> Path:
    """Debian's opencv-doc unpacked into ``into``; returns its examples folder."""
    _run(["dpkg-deb", "-x", str(_download(OPENCV_DOC, downloads)), str(into)], into)
    return into / "usr/share/doc/opencv-doc/examples"


def _skimage_photos(downloads: Path, into: Path, names: frozenset[str] | None = None) -> None:
    """scikit-image's bundled photos (those named, or all) as ``skimage-<name>``."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_download(SCIKIT_IMAGE, downloads)) as wheel:
        for entry in wheel.namelist():
            name = Path(entry).name
            photo = entry.startswith("skimage/data/") and Path(entry).suffix.lower() in PHOTO_SUFFIXES
            if photo and (names is None or name in names):
                (into / f"skimage-{name}").write_bytes(wheel.read(entry))


def _fetch_demo(downloads: Path, demo: Path) -> None:
    """The demo's photos; complete once opencv-doc's are in (tried again on the next fetch)."""
    _skimage_photos(downloads, demo, frozenset({RECORDING_PHOTO.removeprefix("skimage-")}))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            examples = _opencv_examples(downloads, Path(tmp))
            for member in DEMO_OPENCV_PHOTOS:
                shutil.copyfile(examples / member, demo / f"opencv-{member.replace('/', '-')}")
    except (OSError, subprocess.CalledProcessError) as exc:  # not a Debian 12 apt, or no dpkg-deb
        logger.warning("opencv-doc is not available here (%s): the demo has one photo with text", exc)
        return
    (demo / ".complete").touch()


def fetch_assets(assets_dir: Path, test_material: bool = False) -> dict[str, int]:
    """Download (cached), verify and unpack; returns how many files each part holds."""
    downloads = assets_dir / "downloads"
    models, demo = assets_dir / "models", assets_dir / "demo"
    photos, edge = assets_dir / "photos", assets_dir / "edge"

    model_file = models / Path(MODEL_MEMBER).name
    if not model_file.is_file():
        models.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(_download(RAPIDOCR, downloads)) as wheel:
            model_file.write_bytes(wheel.read(MODEL_MEMBER))

    if not (demo / ".complete").is_file():
        _fetch_demo(downloads, demo)
    _record_fake_map(model_file, demo / RECORDING_PHOTO)

    if test_material and not (photos / ".complete").is_file():
        _skimage_photos(downloads, photos)
        with tempfile.TemporaryDirectory() as tmp:
            examples = _opencv_examples(downloads, Path(tmp))
            for sub in OPENCV_PHOTO_DIRS:
                _copy_images(examples / sub, photos, f"opencv-{sub.replace('/', '-')}-")
        (photos / ".complete").touch()

    if test_material and not (edge / ".complete").is_file():
        edge.mkdir(parents=True, exist_ok=True)
        with tarfile.open(_download(PILLOW_SDIST, downloads)) as sdist:
            for image_name in EDGE_CASES:
                member = sdist.extractfile(f"pillow-13.0.0/Tests/images/{image_name}")
                if member is None:  # a directory or link where an image should be
                    raise RuntimeError(f"{image_name} is missing from {PILLOW_SDIST.filename}")
                (edge / image_name.replace("/", "-")).write_bytes(member.read())
        (edge / ".complete").touch()

    def count(folder: Path) -> int:
        return len([p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES]) if folder.is_dir() else 0

    return {
        "models": len(list(models.glob("*.onnx"))),
        "demo photos": count(demo),
        "test photos": count(photos),
        "edge": len(list(edge.glob("*.*"))) if edge.is_dir() else 0,
    }
