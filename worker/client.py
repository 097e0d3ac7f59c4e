"""Producer API: submit images as jobs and wait for their results (asyncio, with a sync wrapper).

Waiting blocks on a per-job notification list (BLPOP) instead of polling the result key. Both
submitting and waiting ride out a Redis restart: connection errors are retried with backoff until
the call's own timeout, and results already collected are never dropped. A Redis the client has
never reached (a wrong URL, a server not up) is reported after ``connect_timeout_s`` instead. A
refusal (out of memory, a key of the wrong type) is reported at once. Submitting again after an
error is safe: the enqueue script adds a job id once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
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
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from worker.core.errors import BrokerError, InvalidJobError, RedisRefusedError
from worker.core.protocol import (
    DEFAULT_PRIORITY,
    ENQUEUE_MEMORY_FRACTION,
    ENQUEUE_SCRIPT,
    FOREIGN_RESULT_KEY,
    PRIORITIES,
    JobRequest,
    JobResult,
    new_job_id,
)
from worker.core.settings import RedisSettings
from worker.transport.connection import PRODUCER_BACKOFF, broker_error, connect, keys_for, mapped, redact

ImageInput = bytes | bytearray | memoryview | str | Path | npt.NDArray[Any]
#: BLPOP accepts many keys at once; beyond this many we wait in slices to keep commands small
WAIT_KEYS_PER_CALL = 512
#: how long ``submit`` keeps retrying one round trip while Redis is away
SUBMIT_TIMEOUT_S = 30.0
#: how long a client keeps trying a Redis it has never reached before it says so
CONNECT_TIMEOUT_S = 5.0
#: image bytes sent in one pipelined round trip; a larger submission is sent in several, so a
#: 40,000-image list (1.7 GB) never becomes one write that outlasts the socket timeout
SUBMIT_CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
MIB = 1 << 20
T = TypeVar("T")


class SubmitError(BrokerError):
    """Some jobs of a submission are not stored. ``stored``: the ids Redis holds (they will run);
    ``failed``: id -> why not. Submitting the failed ids again is safe: an id is added once."""

    def __init__(self, message: str, stored: list[str], failed: dict[str, str]) -> None:
        super().__init__(message)
        self.stored = stored
        self.failed = failed


def content_job_id(image: bytes, priority: int = DEFAULT_PRIORITY, tensors: bool = False) -> str:
    """A job id derived from the image and the options: submitting the same input again (say,
    re-running a command after a partial failure) names the same job, which the enqueue script
    adds once, and a waiter finds the result already stored."""
    digest = hashlib.blake2b(image, digest_size=15, person=f"imgworker-p{priority}t{int(tensors)}".encode())
    return "c" + digest.hexdigest()


def _result_from_reply(job_id: str, key: str, reply: Any) -> JobResult | None:
    """The result in an HGETALL reply: None while there is none; an error result when the key holds
    something else (another type, or a hash that is not a result), never an exception."""
    if isinstance(reply, ResponseError):
        if not str(reply).startswith("WRONGTYPE"):
            raise reply
        return JobResult.failure(job_id, FOREIGN_RESULT_KEY, f"{key} holds another type than a result: left as it is")
    return JobResult.decode(reply, job_id) if reply else None


def _lacks_figures(reply: RedisError) -> bool:
    """An out-of-memory refusal by Redis itself, which says nothing of how full it is (the enqueue
    script's own refusal, 'out of memory for new jobs', gives both figures)."""
    return isinstance(reply, OutOfMemoryError) and "for new jobs" not in str(reply)


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
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """``redis_settings`` (credentials, TLS, timeouts) wins over ``url`` and ``prefix``.
        ``connect_timeout_s``: how long calls retry a Redis this client has never reached (give a
        longer one to wait for a server that is starting); once reached, each call rides out
        outages up to its own timeout."""
        settings = redis_settings or RedisSettings(url=url, prefix=prefix)
        self.connect_timeout_s = connect_timeout_s
        self._reached = False
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

    def _unreachable(self, started: float, exc: BrokerError) -> BrokerError | None:
        """The error to give up with, once a Redis never reached has been tried long enough."""
        if self._reached or time.monotonic() - started < self.connect_timeout_s:
            return None
        cause = exc.__cause__ or exc
        return BrokerError(
            f"cannot reach Redis at {redact(self.url)} (tried for {time.monotonic() - started:.1f} s): {cause}"
        )

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        """Retry ``call`` on connection errors with backoff until ``deadline`` (monotonic; None:
        forever), or ``connect_timeout_s`` while Redis was never reached; a refusal is not retried."""
        started, delays = time.monotonic(), PRODUCER_BACKOFF.delays()
        while True:
            try:
                with mapped(what, self.url):
                    result = await call()
                self._reached = True
                return result
            except RedisRefusedError:
                self._reached = True
                raise
            except BrokerError as exc:
                if unreachable := self._unreachable(started, exc):
                    raise unreachable from exc
                delay = next(delays)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)

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
        each (each retried for up to ``timeout_s``); returns their job ids in order.

        Raises SubmitError when some are not stored: Redis refused them (out of memory), or a round
        trip failed; it names the ids stored and why each other one is not. What follows a failed
        round trip is not sent. Submitting the same ids again is safe."""
        job_ids = job_ids or [None] * len(images)
        sources = sources or [""] * len(images)
        requests = [
            self._request(img, job_id=jid, priority=priority, deadline_s=deadline_s, tensors=tensors, source=src)
            for img, jid, src in zip(images, job_ids, sources, strict=True)
        ]
        stored: list[str] = []
        failed: dict[str, str] = {}
        for chunk in _chunks_by_bytes(requests, SUBMIT_CHUNK_BYTES):
            if failed:
                failed.update((r.job_id, "not sent: an earlier round trip of this submission failed") for r in chunk)
                continue
            try:
                refused = await self._retrying(
                    "enqueue", functools.partial(self._send, chunk), time.monotonic() + timeout_s
                )
            except BrokerError as exc:
                refused = {r.job_id: str(exc) for r in chunk}
            stored += [r.job_id for r in chunk if r.job_id not in refused]
            failed.update(refused)
        if failed:
            reasons = sorted(set(failed.values()), key=list(failed.values()).index)
            raise SubmitError(f"{len(failed)} of {len(requests)} jobs are not stored: {reasons[0]}", stored, failed)
        return [r.job_id for r in requests]

    async def _send(self, requests: list[JobRequest]) -> dict[str, str]:
        """One pipelined round trip: the enqueue script once per shard, then Redis WAIT when
        replicas are asked for. Returns the jobs Redis refused, with its reason."""
        by_shard: dict[int, list[JobRequest]] = {}
        for request in requests:
            by_shard.setdefault(self.keys.shard_of(request.job_id), []).append(request)
        streams = {self.keys.stream(r.priority, self.keys.shard_of(r.job_id)) for r in requests}
        async with self.redis.pipeline(transaction=False) as pipe:
            if self.cluster and self._enqueue_sha is None:  # redis-py refuses script objects in cluster pipelines
                self._enqueue_sha = await self.redis.script_load(ENQUEUE_SCRIPT)  # on every master
            for group in by_shard.values():
                keys, args = self._enqueue_call(group)
                if self.cluster:
                    pipe.execute_command("EVALSHA", self._enqueue_sha, len(keys), *keys, *args)
                else:
                    await self._enqueue(keys=keys, args=args, client=pipe)
            waits = self._wait_for_replicas(pipe, streams)
            replies = await pipe.execute(raise_on_error=False)
        refused: dict[str, str] = {}
        for group, reply in zip(by_shard.values(), replies, strict=False):
            if isinstance(reply, NoScriptError):  # a replica took over and has no script cache yet
                self._enqueue_sha = None
            if isinstance(reply, RedisError):
                error = broker_error("enqueue", reply, self.url)
                if not isinstance(error, RedisRefusedError):
                    raise error from reply  # retried, the whole round trip: an id is added once
                # Redis's own out-of-memory refusal has no figures (the enqueue script's has)
                reason = f"{error} ({await self._memory()})" if _lacks_figures(reply) else str(error)
                refused.update((r.job_id, reason) for r in group)
        replica_counts = replies[len(replies) - waits :]
        if waits and (any(isinstance(n, Exception) for n in replica_counts) or min(replica_counts) < self.replicas):
            raise BrokerError(f"only {replica_counts} of {self.replicas} replicas have the jobs")
        return refused

    async def _memory(self) -> str:
        """Redis's memory figures, for a refusal that came without them (Redis's own, at maxmemory)."""
        memory = await self.redis.info("memory")
        return f"Redis uses {memory['used_memory'] / MIB:.1f} MiB of its maxmemory {memory['maxmemory'] / MIB:.1f} MiB"

    def _enqueue_call(self, requests: list[JobRequest]) -> tuple[list[str], list[Any]]:
        """The enqueue script's keys (seen marker and stream of each job) and arguments (see
        ENQUEUE_SCRIPT) for jobs of one shard."""
        keys: list[str] = []
        args: list[Any] = [self.result_ttl_s, ENQUEUE_MEMORY_FRACTION]
        for request in requests:
            keys += [
                self.keys.seen(request.job_id),
                self.keys.stream(request.priority, self.keys.shard_of(request.job_id)),
            ]
            fields = request.encode()
            args.append(len(fields))
            args += [x for kv in fields.items() for x in kv]
        return keys, args

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
        key = self.keys.result(job_id)
        replies = await self._retrying(
            "result", lambda: self._pipelined(lambda pipe: pipe.hgetall(key)), time.monotonic() + SUBMIT_TIMEOUT_S
        )
        return _result_from_reply(job_id, key, replies[0])

    async def _pipelined(self, queue: Callable[[Any], object]) -> list[Any]:
        """One round trip; a command's error comes back in its place (a key of the wrong type is one
        job's problem, not the whole call's)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            replies = list(await pipe.execute(raise_on_error=False))
        self._reached = True
        return replies

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

        While Redis is away this keeps retrying until the timeout; what was collected stays. A job
        whose result key holds something else than a result gets an error result saying so.
        """
        pending = list(dict.fromkeys(job_ids))
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        results: dict[str, JobResult] = {}
        delays = PRODUCER_BACKOFF.delays()
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
                delays = PRODUCER_BACKOFF.delays()
            except BrokerError as exc:
                if unreachable := self._unreachable(started, exc):
                    raise unreachable from exc
                delay = next(delays)
                if left is not None and left <= delay:
                    break
                await asyncio.sleep(delay)
                check_all = True  # notifications may have been lost with the connection
        return results

    async def _pop_done(self, pending: list[str], timeout_s: float) -> list[str]:
        """Job ids whose notification arrived, blocking at most ``timeout_s`` (then the caller checks
        every job: a notification taken by another waiter, or for a job past the first
        WAIT_KEYS_PER_CALL, is found that way). On a cluster, one BLPOP per shard: keys of one slot."""
        if not self.cluster:
            popped = await self.redis.blpop([self.keys.done(j) for j in pending[:WAIT_KEYS_PER_CALL]], timeout_s)
            self._reached = True
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
        self._reached = True
        return [self.keys.job_id_of_done(reply[0]) for reply in replies if reply]

    async def _drain_done(self, job_ids: list[str]) -> list[str]:
        """Of these, the jobs notified meanwhile, in one round trip: under load one wake-up collects
        every result that arrived, so a waiter's cost per result does not grow with the window."""
        notified = await self._pipelined(lambda pipe: [pipe.lpop(self.keys.done(job_id)) for job_id in job_ids])
        # a done key of another type is not ours (its job's result is found by looking)
        return [job_id for job_id, reply in zip(job_ids, notified, strict=True) if isinstance(reply, bytes | str)]

    async def _collect(
        self, job_ids: list[str], into: dict[str, JobResult], on_result: Callable[[str, JobResult], None] | None
    ) -> list[str]:
        """Fetches the results of these jobs that are stored; returns the ids newly collected."""
        found: list[str] = []
        keys = [self.keys.result(job_id) for job_id in job_ids]
        replies = await self._pipelined(lambda pipe: [pipe.hgetall(key) for key in keys])
        for job_id, key, reply in zip(job_ids, keys, replies, strict=True):
            if job_id not in into and (result := _result_from_reply(job_id, key, reply)) is not None:
                into[job_id] = result
                found.append(job_id)
                if on_result is not None:
                    on_result(job_id, result)
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
