"""Producer API: submit images as jobs and wait for their results (asyncio, with a sync wrapper).

Waiting blocks on a per-job notification list (BLPOP) instead of polling the result key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.errors import BrokerError, InvalidJobError
from worker.protocol import DEFAULT_PRIORITY, ENQUEUE_SCRIPT, PRIORITIES, JobRequest, JobResult, Keys, new_job_id

ImageInput = bytes | bytearray | memoryview | str | Path | npt.NDArray[Any]
#: BLPOP accepts many keys at once; beyond this many we wait in slices to keep commands small
WAIT_KEYS_PER_CALL = 512


def image_bytes(image: ImageInput) -> bytes:
    """Bytes of an encoded image, a file path, or an HxW / HxWxC uint8 array (sent as lossless PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise InvalidJobError(f"cannot encode an array of shape {image.shape} and dtype {image.dtype} as PNG")
        return encoded.tobytes()
    raise InvalidJobError(f"unsupported image type {type(image).__name__}")


class AsyncClient:
    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "imgworker", result_ttl_s: int = 3600
    ) -> None:
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self._enqueue = self.redis.register_script(ENQUEUE_SCRIPT)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.redis.aclose()

    def _request(
        self,
        image: ImageInput,
        *,
        job_id: str | None,
        priority: int,
        deadline_s: float | None,
        tensors: bool,
        source: str,
    ) -> JobRequest:
        if priority not in PRIORITIES:
            raise InvalidJobError(f"priority must be one of {PRIORITIES}, got {priority}")
        now = time.time()
        return JobRequest(
            job_id=job_id or new_job_id(),
            image=image_bytes(image),
            priority=priority,
            deadline_ms=int((now + deadline_s) * 1000) if deadline_s else 0,
            enqueued_ms=int(now * 1000),
            want_tensors=tensors,
            source=source,
        )

    async def submit(
        self,
        image: ImageInput,
        *,
        job_id: str | None = None,
        priority: int = DEFAULT_PRIORITY,
        deadline_s: float | None = None,
        tensors: bool = False,
        source: str = "",
    ) -> str:
        """Enqueue one image; returns its job id. Re-submitting a job id already seen enqueues nothing."""
        ids = await self.submit_many(
            [image], job_ids=[job_id], priority=priority, deadline_s=deadline_s, tensors=tensors, sources=[source]
        )
        return ids[0]

    async def submit_many(
        self,
        images: Sequence[ImageInput],
        *,
        job_ids: Sequence[str | None] | None = None,
        priority: int = DEFAULT_PRIORITY,
        deadline_s: float | None = None,
        tensors: bool = False,
        sources: Sequence[str] | None = None,
    ) -> list[str]:
        """Enqueue many images in one pipelined round trip; returns their job ids in order."""
        job_ids = job_ids or [None] * len(images)
        sources = sources or [""] * len(images)
        requests = [
            self._request(img, job_id=jid, priority=priority, deadline_s=deadline_s, tensors=tensors, source=src)
            for img, jid, src in zip(images, job_ids, sources, strict=True)
        ]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for r in requests:
                    args = [self.result_ttl_s, *(x for kv in r.encode().items() for x in kv)]
                    await self._enqueue(
                        keys=[self.keys.seen(r.job_id), self.keys.stream(r.priority)], args=args, client=pipe
                    )
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"enqueue failed: {exc}") from exc
        return [r.job_id for r in requests]

    async def result(self, job_id: str) -> JobResult | None:
        """The stored result, or None while the job is not finished (or its result expired)."""
        fields: dict[Any, Any] = await self.redis.hgetall(self.keys.result(job_id))
        return JobResult.decode(fields) if fields else None

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobResult:
        results = await self.wait_many([job_id], timeout_s)
        return results[job_id]

    async def wait_many(self, job_ids: Iterable[str], timeout_s: float | None = None) -> dict[str, JobResult]:
        """Block until every job has a result; raises TimeoutError saying how many are missing."""
        wanted = list(dict.fromkeys(job_ids))
        results = await self.gather(wanted, timeout_s)
        if len(results) < len(wanted):
            raise TimeoutError(f"{len(wanted) - len(results)} of {len(wanted)} jobs have no result yet")
        return results

    async def gather(
        self,
        job_ids: Iterable[str],
        timeout_s: float | None = None,
        on_result: Callable[[str, JobResult], None] | None = None,
    ) -> dict[str, JobResult]:
        """The results that arrive before the timeout (all of them, with no timeout)."""
        pending = list(dict.fromkeys(job_ids))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: dict[str, JobResult] = {}
        await self._collect(pending, results, on_result)
        while pending := [j for j in pending if j not in results]:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            # Block at most a second at a time: a notification taken by another waiter, or a job
            # beyond the first WAIT_KEYS_PER_CALL, is then found by the full check.
            popped = await self.redis.blpop(
                [self.keys.done(j) for j in pending[:WAIT_KEYS_PER_CALL]], timeout=min(left or 1.0, 1.0)
            )
            await self._collect([self.keys.job_id_of_done(popped[0])] if popped else pending, results, on_result)
        return results

    async def _collect(
        self, job_ids: list[str], into: dict[str, JobResult], on_result: Callable[[str, JobResult], None] | None
    ) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.result(job_id))
            replies = await pipe.execute()
        for job_id, fields in zip(job_ids, replies, strict=True):
            if fields and job_id not in into:
                into[job_id] = JobResult.decode(fields)
                if on_result is not None:
                    on_result(job_id, into[job_id])


class Client:
    """Blocking facade over AsyncClient for scripts and non-async services (not inside an event loop)."""

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "imgworker", result_ttl_s: int = 3600
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._make(url, prefix, result_ttl_s))

    @staticmethod
    async def _make(url: str, prefix: str, result_ttl_s: int) -> AsyncClient:
        return AsyncClient(url, prefix, result_ttl_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()

    def submit(self, image: ImageInput, **options: Any) -> str:
        return self._runner.run(self._client.submit(image, **options))

    def submit_many(self, images: Sequence[ImageInput], **options: Any) -> list[str]:
        return self._runner.run(self._client.submit_many(images, **options))

    def result(self, job_id: str) -> JobResult | None:
        return self._runner.run(self._client.result(job_id))

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobResult:
        return self._runner.run(self._client.wait(job_id, timeout_s))

    def wait_many(self, job_ids: Iterable[str], timeout_s: float | None = None) -> dict[str, JobResult]:
        return self._runner.run(self._client.wait_many(job_ids, timeout_s))
