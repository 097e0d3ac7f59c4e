"""Probability map to text boxes (DBNet), mapped back to the original image's pixel coordinates.

Maps come as float32 in [0, 1] or as uint8 (the map times 255, rounded, from the engine): the
thresholds are the spec's either way, and scores are reported in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from worker.core.buckets import PostprocessSpec

ProbMap = npt.NDArray[np.float32] | npt.NDArray[np.uint8]
Points = npt.NDArray[np.float32]


def order_clockwise(points: Points) -> Points:
    """Top-left, top-right, bottom-right, bottom-left."""
    return np.array(_clockwise(points.tolist()), dtype=np.float32)


def _clockwise(points: list[list[float]]) -> list[list[float]]:
    """``order_clockwise`` on plain lists: four points are cheaper in Python than in numpy."""
    by_x = sorted(points, key=lambda p: p[0])
    top_left, bottom_left = sorted(by_x[:2], key=lambda p: p[1])
    top_right, bottom_right = sorted(by_x[2:], key=lambda p: p[1])
    return [top_left, top_right, bottom_right, bottom_left]


def _mean_inside(prob: ProbMap, box: npt.NDArray[Any]) -> float:
    """Mean of the map inside a rotated rectangle (its corners in cyclic order)."""
    height, width = prob.shape
    xs, ys = box[:, 0].tolist(), box[:, 1].tolist()
    x0, x1 = min(max(math.floor(min(xs)), 0), width - 1), min(max(math.ceil(max(xs)), 0), width - 1)
    y0, y1 = min(max(math.floor(min(ys)), 0), height - 1), min(max(math.ceil(max(ys)), 0), height - 1)
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    corners = (box - np.array([x0, y0], np.float32)).round().astype(np.int32)
    cv2.fillPoly(mask, [corners], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def text_boxes(prob: ProbMap, spec: PostprocessSpec, original_height: int, original_width: int) -> list[dict[str, Any]]:
    """Boxes from the valid (unpadded) region of one probability map, in original coordinates.

    The map's size is the resized input's size, so scaling by original/resized undoes the resize;
    padding was cropped away by the caller.
    """
    height, width = prob.shape
    unit = 255.0 if prob.dtype == np.uint8 else 1.0
    # uint8 pixels above thresh*255 are those of maps above thresh: OpenCV floors 8-bit thresholds
    _, bitmap = cv2.threshold(prob, spec.thresh * unit, 1, cv2.THRESH_BINARY)
    bitmap = bitmap.astype(np.uint8, copy=False)
    if spec.use_dilation:
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale_x, scale_y = original_width / width, original_height / height
    boxes: list[dict[str, Any]] = []
    for contour in contours[: spec.max_candidates]:
        center, (rect_w, rect_h), angle = cv2.minAreaRect(contour)
        if min(rect_w, rect_h) < spec.min_size:
            continue
        score = _mean_inside(prob, cv2.boxPoints((center, (rect_w, rect_h), angle))) / unit
        if score < spec.box_thresh:
            continue
        # Unclip: grow the rectangle by area * ratio / perimeter on every side, as DBNet prescribes.
        grow = rect_w * rect_h * spec.unclip_ratio / (2.0 * (rect_w + rect_h))
        grown_w, grown_h = rect_w + 2 * grow, rect_h + 2 * grow
        if min(grown_w, grown_h) < spec.min_size + 2:
            continue
        grown = _clockwise(cv2.boxPoints((center, (grown_w, grown_h), angle)).tolist())
        points = [
            [
                round(min(max(x * scale_x, 0.0), original_width - 1), 1),
                round(min(max(y * scale_y, 0.0), original_height - 1), 1),
            ]
            for x, y in grown
        ]
        boxes.append({"points": points, "score": round(score, 4)})
    boxes.sort(key=lambda b: (b["points"][0][1], b["points"][0][0]))
    return boxes
