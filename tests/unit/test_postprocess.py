from __future__ import annotations

import numpy as np

from worker.compute.postprocess import order_clockwise, text_boxes
from worker.core.buckets import PostprocessSpec


def test_order_clockwise_starts_top_left() -> None:
    pts = np.array([[10, 10], [0, 10], [0, 0], [10, 0]], np.float32)
    assert order_clockwise(pts).tolist() == [[0, 0], [10, 0], [10, 10], [0, 10]]


def test_boxes_map_back_to_original_pixels() -> None:
    """A text blob in a 320x480 map of a 600x900 image lands at 600/320, 900/480 scale, unclipped outward."""
    prob = np.zeros((320, 480), np.float32)
    prob[100:120, 50:250] = 0.9  # a 200x20 text line in model coordinates
    spec = PostprocessSpec()
    boxes = text_boxes(prob, spec, original_height=600, original_width=900)
    assert len(boxes) == 1
    points = np.array(boxes[0]["points"])
    sx, sy = 900 / 480, 600 / 320
    grow = 201 * 21 * spec.unclip_ratio / (2 * (201 + 21))  # area * ratio / perimeter of the dilated blob
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    assert abs(x0 - (50 - grow) * sx) < 3 * sx and abs(x1 - (250 + grow) * sx) < 3 * sx
    assert abs(y0 - (100 - grow) * sy) < 3 * sy and abs(y1 - (120 + grow) * sy) < 3 * sy
    assert boxes[0]["score"] > 0.85


def test_boxes_are_clipped_to_the_image_and_weak_blobs_dropped() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[0:10, 0:40] = 0.95  # touches the corner: unclipping would leave the image
    prob[40:50, 10:50] = 0.35  # above thresh, below box_thresh
    boxes = text_boxes(prob, PostprocessSpec(), original_height=64, original_width=64)
    assert len(boxes) == 1
    points = np.array(boxes[0]["points"])
    assert points.min() >= 0 and points.max() <= 63
