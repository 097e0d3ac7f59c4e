"""Comparing detected text boxes between runs."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

#: boxes this far above the detector's box_thresh (0.5) must appear in both runs; weaker ones may
#: flip across the threshold when float rounding differs by a hair
CLEAR_SCORE = 0.52
#: decoders that are not bit-exact with libjpeg's integer IDCT (the GPU's JPEG engines: about half
#: a grey level) move small boxes' outlines by a pixel and scores by a little: no box scoring at
#: least DECODED_CLEAR_SCORE may be lost (a counterpart of IoU >= FOUND_IOU), and at most
#: MOVED_SHARE of them may lack one of IoU >= 0.9 (libjpeg-turbo's own fast IDCT leaves 11 of 254
#: without one on the sample photos, docs/measurements/notes.md)
DECODED_CLEAR_SCORE, FOUND_IOU, MOVED_SHARE = 0.6, 0.5, 0.05


def box_iou(a: list[list[float]], b: list[list[float]]) -> float:
    """IoU of two quadrilaterals, rasterised at 0.5 px."""
    pa, pb = (np.array(p, np.float32) * 2 for p in (a, b))
    size = np.ceil(np.maximum(pa.max(0), pb.max(0))).astype(int) + 2
    ma, mb = (np.zeros((size[1], size[0]), np.uint8) for _ in range(2))
    cv2.fillPoly(ma, [pa.round().astype(np.int32)], 1)
    cv2.fillPoly(mb, [pb.round().astype(np.int32)], 1)
    return float((ma & mb).sum() / max((ma | mb).sum(), 1))


def unmatched(boxes: list[dict[str, Any]], others: list[dict[str, Any]], min_iou: float, min_score: float) -> list[Any]:
    """Boxes scoring at least ``min_score`` with no counterpart of IoU >= ``min_iou`` in ``others``."""
    return [
        box
        for box in boxes
        if box["score"] >= min_score
        and max((box_iou(box["points"], o["points"]) for o in others), default=0.0) < min_iou
    ]
