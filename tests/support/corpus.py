"""Benchmark corpora from the sample photos (fetched by scripts/setup.sh, never committed)."""

from __future__ import annotations

from pathlib import Path

import cv2

from worker.core.settings import Settings


def sample_photos(assets_dir: Path | None = None) -> list[Path]:
    folder = (assets_dir or Settings().assets_dir) / "photos"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def resized_jpegs(size: tuple[int, int], count: int, quality: int = 90) -> list[bytes]:
    """The photos resized to ``size`` (width, height) and re-encoded as JPEGs, repeated to ``count`` jobs."""
    encoded = []
    for photo in sample_photos():
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if image is not None and min(image.shape[:2]) >= 64:
            resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            encoded.append(cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    return [encoded[i % len(encoded)] for i in range(count)]
