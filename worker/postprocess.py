"""Probability map to text boxes (DBNet), mapped back to the original image's pixel coordinates."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from worker.buckets import PostprocessSpec

FloatMap = npt.NDArray[np.float32]
Points = npt.NDArray[np.float32]


def order_clockwise(points: Points) -> Points:
    """Top-left, top-right, bottom-right, bottom-left."""
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1], kind="stable")]
    top_right, bottom_right = right[np.argsort(right[:, 1], kind="stable")]
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float32)


def _mean_inside(prob: FloatMap, box: Points) -> float:
    height, width = prob.shape
    x0, y0 = np.clip(np.floor(box.min(0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(box.max(0)).astype(int), 0, [width - 1, height - 1])
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.fillPoly(mask, [(box - [x0, y0]).round().astype(np.int32)], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def text_boxes(
    prob: FloatMap, spec: PostprocessSpec, original_height: int, original_width: int
) -> list[dict[str, Any]]:
    """Boxes from the valid (unpadded) region of one probability map, in original coordinates.

    The map's size is the resized input's size, so scaling by original/resized undoes the resize;
    padding was cropped away by the caller.
    """
    height, width = prob.shape
    bitmap = (prob > spec.thresh).astype(np.uint8)
    if spec.use_dilation:
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))  # type: ignore[assignment]
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale = np.array([original_width / width, original_height / height], dtype=np.float32)
    limit = np.array([original_width - 1, original_height - 1], dtype=np.float32)
    boxes: list[dict[str, Any]] = []
    for contour in contours[: spec.max_candidates]:
        center, (rect_w, rect_h), angle = cv2.minAreaRect(contour)
        if min(rect_w, rect_h) < spec.min_size:
            continue
        box = order_clockwise(np.asarray(cv2.boxPoints((center, (rect_w, rect_h), angle)), np.float32))
        score = _mean_inside(prob, box)
        if score < spec.box_thresh:
            continue
        # Unclip: grow the rectangle by area * ratio / perimeter on every side, as DBNet prescribes.
        grow = rect_w * rect_h * spec.unclip_ratio / (2.0 * (rect_w + rect_h))
        grown_w, grown_h = rect_w + 2 * grow, rect_h + 2 * grow
        if min(grown_w, grown_h) < spec.min_size + 2:
            continue
        grown = order_clockwise(np.asarray(cv2.boxPoints((center, (grown_w, grown_h), angle)), np.float32))
        mapped = np.clip(grown * scale, 0, limit)
        boxes.append({"points": mapped.astype(np.float64).round(1).tolist(), "score": round(score, 4)})
    boxes.sort(key=lambda b: (b["points"][0][1], b["points"][0][0]))
    return boxes
