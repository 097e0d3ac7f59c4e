"""Producer API: submit images as jobs and wait for their results (asyncio, with a sync wrapper).

Waiting blocks on a per-job notification list (BLPOP) instead of polling the result key. Both
submitting and waiting ride out a Redis restart: connection errors are retried with backoff until
the call's own timeout, and results already collected are never dropped. Submitting again after an
error is safe: the enqueue script adds a job id once.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import cv2
import numpy as np
import numpy.typing as npt
from redis.exceptions import NoScriptError

from worker.connection import connect, keys_for, mapped
from worker.errors import BrokerError, InvalidJobError
from worker.protocol import DEFAULT_PRIORITY, ENQUEUE_SCRIPT, PRIORITIES, JobRequest, JobResult, new_job_id
from worker.settings import RedisSettings

ImageInput = bytes | bytearray | memoryview | str | Path | npt.NDArray[Any]
#: BLPOP accepts many keys at once; beyond this many we wait in slices to keep commands small
WAIT_KEYS_PER_CALL = 512
#: how long ``submit`` keeps retrying one round trip while Redis is away
SUBMIT_TIMEOUT_S = 30.0
#: image bytes sent in one pipelined round trip; a larger submission is sent in several, so a
#: 40,000-image list (1.7 GB) never becomes one write that outlasts the socket timeout
SUBMIT_CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
_BACKOFF_FIRST_S, _BACKOFF_CAP_S = 0.05, 1.0
T = TypeVar("T")


def _chunks_by_bytes(requests: list[JobRequest], limit: int) -> Iterable[list[JobRequest]]:
    """Consecutive runs of requests whose images add up to at most ``limit`` bytes (one at least)."""
    chunk: list[JobRequest] = []
    size = 0
    for request in requests:
        if chunk and size + len(request.image) > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(request)
        size += len(request.image)
    if chunk:
        yield chunk


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A regular file's bytes, its size checked before reading (never a device, FIFO or /dev/zero)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; symlinks are followed, their target checked
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidJobError(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise InvalidJobError(f"{path} is {info.st_size} bytes, the limit is {max_bytes}")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise InvalidJobError(f"{path} is larger than {max_bytes} bytes")
    return data


def image_bytes(image: ImageInput, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """Bytes of an encoded image, a file path, or an HxW / HxWxC uint8 array (sent as lossless PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return read_image_file(image, max_bytes)
    if isinstance(image, np.ndarray):
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise InvalidJobError(f"cannot encode an array of shape {image.shape} and dtype {image.dtype} as PNG")
        return encoded.tobytes()
    raise InvalidJobError(f"unsupported image type {type(image).__name__}")


class AsyncClient:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "imgworker",
        result_ttl_s: int = 3600,
        *,
        redis_settings: RedisSettings | None = None,
    ) -> None:
        """``redis_settings`` (credentials, TLS, timeouts) wins over ``url`` and ``prefix``."""
        settings = redis_settings or RedisSettings(url=url, prefix=prefix)
        self.keys = keys_for(settings)
        self.cluster = settings.cluster
        self.replicas = settings.replicas
        self._enqueue_sha: str | None = None
        self.url = settings.url
        self.result_ttl_s = result_ttl_s
        self.redis: Any = connect(settings)  # Redis, or RedisCluster
        self._enqueue = self.redis.register_script(ENQUEUE_SCRIPT)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        """Retry ``call`` on connection errors with backoff until ``deadline`` (monotonic; None: forever)."""
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                with mapped(what, self.url):
                    return await call()
            except BrokerError:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP_S)

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
        timeout_s: float = SUBMIT_TIMEOUT_S,
    ) -> list[str]:
        """Enqueue many images, pipelined in round trips of up to ``SUBMIT_CHUNK_BYTES`` of images
        each (each retried for up to ``timeout_s``); returns their job ids in order. After an
        error, some chunks may be queued already: submitting the same job ids again is safe."""
        job_ids = job_ids or [None] * len(images)
        sources = sources or [""] * len(images)
        requests = [
            self._request(img, job_id=jid, priority=priority, deadline_s=deadline_s, tensors=tensors, source=src)
            for img, jid, src in zip(images, job_ids, sources, strict=True)
        ]
        for chunk in _chunks_by_bytes(requests, SUBMIT_CHUNK_BYTES):
            await self._retrying("enqueue", functools.partial(self._send, chunk), time.monotonic() + timeout_s)
        return [r.job_id for r in requests]

    async def _send(self, requests: list[JobRequest]) -> None:
        """One pipelined round trip: the enqueue script per job, then Redis WAIT when replicas are asked for."""
        streams = {self.keys.stream(r.priority, self.keys.shard_of(r.job_id)) for r in requests}
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.cluster:  # redis-py refuses script objects in cluster pipelines: plain EVALSHA
                if self._enqueue_sha is None:
                    self._enqueue_sha = await self.redis.script_load(ENQUEUE_SCRIPT)  # on every master
                for r in requests:
                    pipe.execute_command("EVALSHA", self._enqueue_sha, 2, *self._enqueue_call(r))
            else:
                for r in requests:
                    call = self._enqueue_call(r)
                    await self._enqueue(keys=call[:2], args=call[2:], client=pipe)
            waits = self._wait_for_replicas(pipe, streams)
            try:
                replies = await pipe.execute()
            except NoScriptError:  # a replica took over and has no script cache yet
                self._enqueue_sha = None
                raise
        if waits and min(replies[-waits:]) < self.replicas:
            raise BrokerError(f"only {min(replies[-waits:])} of {self.replicas} replicas have the jobs")

    def _enqueue_call(self, request: JobRequest) -> list[Any]:
        """The enqueue script's two keys (seen marker, stream), then its arguments."""
        stream = self.keys.stream(request.priority, self.keys.shard_of(request.job_id))
        fields = (x for kv in request.encode().items() for x in kv)
        return [self.keys.seen(request.job_id), stream, self.result_ttl_s, *fields]

    def _wait_for_replicas(self, pipe: Any, streams: set[str]) -> int:
        """Queue WAIT behind the writes, on the same connection to each master written to, so a
        submit returns only once ``replicas`` replicas have the jobs (a failover then loses none)."""
        if not self.replicas:
            return 0
        timeout_ms = int(SUBMIT_TIMEOUT_S * 1000 / 3)
        if not self.cluster:
            pipe.execute_command("WAIT", self.replicas, timeout_ms)
            return 1
        nodes = {node.name: node for node in (self.redis.get_node_from_key(stream) for stream in streams)}
        for node in nodes.values():
            pipe.execute_command("WAIT", self.replicas, timeout_ms, target_nodes=node)
        return len(nodes)

    async def result(self, job_id: str) -> JobResult | None:
        """The stored result, or None while the job is not finished (or its result expired)."""
        fields: dict[Any, Any] = await self._retrying(
            "result", lambda: self.redis.hgetall(self.keys.result(job_id)), time.monotonic() + SUBMIT_TIMEOUT_S
        )
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
        """The results that arrive before the timeout (all of them, with no timeout).

        While Redis is away this keeps retrying until the timeout; what was collected stays.
        """
        pending = list(dict.fromkeys(job_ids))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: dict[str, JobResult] = {}
        delay = _BACKOFF_FIRST_S
        check_all = True
        while pending := [j for j in pending if j not in results]:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                with mapped("wait", self.url):
                    if check_all:
                        if found := await self._collect(pending, results, on_result):
                            await self._drain_done(found)  # found by looking: their notifications go too
                        check_all = False
                        continue
                    if left is not None and left <= 0:
                        break
                    popped = await self._pop_done(pending, min(left or 1.0, 1.0))
                    if popped:
                        popped += await self._drain_done([j for j in pending[:WAIT_KEYS_PER_CALL] if j not in popped])
                        await self._collect(popped, results, on_result)
                    else:
                        check_all = True
                delay = _BACKOFF_FIRST_S
            except BrokerError:
                if left is not None and left <= delay:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP_S)
                check_all = True  # notifications may have been lost with the connection
        return results

    async def _pop_done(self, pending: list[str], timeout_s: float) -> list[str]:
        """Job ids whose notification arrived, blocking at most ``timeout_s`` (then the caller checks
        every job: a notification taken by another waiter, or for a job past the first
        WAIT_KEYS_PER_CALL, is found that way). On a cluster, one BLPOP per shard: keys of one slot."""
        if not self.cluster:
            popped = await self.redis.blpop([self.keys.done(j) for j in pending[:WAIT_KEYS_PER_CALL]], timeout_s)
            return [self.keys.job_id_of_done(popped[0])] if popped else []
        by_shard: dict[int, list[str]] = {}
        for job_id in pending:
            by_shard.setdefault(self.keys.shard_of(job_id), []).append(job_id)
        replies = await asyncio.gather(
            *(
                self.redis.blpop([self.keys.done(j) for j in ids[:WAIT_KEYS_PER_CALL]], timeout_s)
                for ids in by_shard.values()
            )
        )
        return [self.keys.job_id_of_done(reply[0]) for reply in replies if reply]

    async def _drain_done(self, job_ids: list[str]) -> list[str]:
        """Of these, the jobs notified meanwhile, in one round trip: under load one wake-up collects
        every result that arrived, so a waiter's cost per result does not grow with the window."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.lpop(self.keys.done(job_id))
            notified = await pipe.execute()
        return [job_id for job_id, status in zip(job_ids, notified, strict=True) if status is not None]

    async def _collect(
        self, job_ids: list[str], into: dict[str, JobResult], on_result: Callable[[str, JobResult], None] | None
    ) -> list[str]:
        """Fetches the results of these jobs that are stored; returns the ids newly collected."""
        found: list[str] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.result(job_id))
            replies = await pipe.execute()
        for job_id, fields in zip(job_ids, replies, strict=True):
            if fields and job_id not in into:
                into[job_id] = JobResult.decode(fields)
                found.append(job_id)
                if on_result is not None:
                    on_result(job_id, into[job_id])
        return found

    async def live_workers(self) -> int:
        """Workers holding a live lease under this prefix (0: nobody will consume what is submitted)."""

        async def count() -> int:
            return len([key async for key in self.redis.scan_iter(match=self.keys.lease("*"), count=1000)])

        return await self._retrying("lease scan", count, time.monotonic() + SUBMIT_TIMEOUT_S)


class Client:
    """Blocking facade over AsyncClient for scripts and non-async services (not inside an event loop)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "imgworker",
        result_ttl_s: int = 3600,
        *,
        redis_settings: RedisSettings | None = None,
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(self._make(url, prefix, result_ttl_s, redis_settings))

    @staticmethod
    async def _make(url: str, prefix: str, result_ttl_s: int, settings: RedisSettings | None) -> AsyncClient:
        return AsyncClient(url, prefix, result_ttl_s, redis_settings=settings)

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

    def gather(
        self,
        job_ids: Iterable[str],
        timeout_s: float | None = None,
        on_result: Callable[[str, JobResult], None] | None = None,
    ) -> dict[str, JobResult]:
        return self._runner.run(self._client.gather(job_ids, timeout_s, on_result))
