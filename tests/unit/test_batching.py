"""The coalescer that feeds the GPU's JPEG decoder, with a CPU decoder standing in for the GPU's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.backends.batching import Coalescer


def _shapes(images: list[bytes]) -> list[tuple[int, ...]]:
    return [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape for data in images]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiting_requests_are_served_together_and_each_caller_gets_its_own(photos: list[Path]) -> None:
    jpegs = [p.read_bytes() for p in photos if p.suffix.lower() in {".jpg", ".jpeg"}][:12]
    assert len(jpegs) == 12
    serving, release = threading.Event(), threading.Event()
    batches: list[int] = []

    def serve(images: list[bytes]) -> list[tuple[int, ...]]:
        serving.set()
        release.wait()  # the first batch holds the thread while the others queue up
        batches.append(len(images))
        return _shapes(images)

    coalescer: Coalescer[bytes, tuple[int, ...]] = Coalescer(serve, capacity=8, name="test")
    requests = [jpegs[0:2], jpegs[2:5], jpegs[5:8], jpegs[8:10], jpegs[10:12]]
    results: dict[int, list[tuple[int, ...]]] = {}

    def call(k: int) -> None:
        results[k] = coalescer.submit(requests[k])

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert serving.wait(10)  # the first request is being served
    for k in range(1, 5):
        threads.append(threading.Thread(target=call, args=(k,)))
        threads[-1].start()
        _wait_for(lambda k=k: coalescer.waiting == k)  # queued in this order
    release.set()
    for thread in threads:
        thread.join(10)
    coalescer.close()
    # the four waiting requests (3 + 3 + 2 + 2 images) make two batches of whole requests: 8, then 2
    assert batches == [2, 8, 2] and coalescer.largest_batch == 8
    for k, request in enumerate(requests):
        assert results[k] == _shapes(request)


def test_a_failed_batch_fails_its_callers_and_the_next_batch_is_served(photos: list[Path]) -> None:
    jpegs = [p.read_bytes() for p in photos if p.suffix.lower() in {".jpg", ".jpeg"}][:2]

    def serve(images: list[bytes]) -> list[tuple[int, ...]]:
        if b"" in images:
            raise ValueError("an empty image")
        return _shapes(images)

    coalescer: Coalescer[bytes, tuple[int, ...]] = Coalescer(serve, capacity=4, name="test")
    try:
        with pytest.raises(ValueError, match="an empty image"):
            coalescer.submit([jpegs[0], b""])
        assert coalescer.submit(jpegs) == _shapes(jpegs)
        with pytest.raises(ValueError, match="do not fit"):
            coalescer.submit(jpegs * 3)
    finally:
        coalescer.close()
    with pytest.raises(RuntimeError, match="closed"):
        coalescer.submit(jpegs)
