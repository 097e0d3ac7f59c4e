"""Redis Streams adapter of the worker: read, lease, reclaim, settle, dead-letter. Knows no backend.

Delivery guarantees:
- an entry is acknowledged only by the same Lua script call that stores its result (atomic), and
  deleted from the stream there too, so acknowledged entries never pile up in Redis memory;
- a result is written once: if a result already exists (a job settled by a worker whose lease was
  wrongly presumed dead), the second settle only acknowledges;
- a worker's pending entries are reclaimed by others only once its lease key has expired
  (heartbeat, not idle time alone); a worker retries its own failed entries after a backoff;
- every claim counts a delivery; past ``max_deliveries`` the service dead-letters the entry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import BrokerError
from worker.protocol import JobResult, Keys
from worker.settings import RedisSettings

logger = logging.getLogger(__name__)

# KEYS: per job (stream, result key, done key). ARGV: ttl_s, group, then per job
# (entry id, field count n, n field/value pairs with status first). Returns results written.
SETTLE_SCRIPT = """
local ttl, group, a, written = ARGV[1], ARGV[2], 3, 0
for k = 1, #KEYS, 3 do
  local stream, result, done = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local entry, n = ARGV[a], tonumber(ARGV[a + 1])
  if redis.call('EXISTS', result) == 0 then
    redis.call('HSET', result, unpack(ARGV, a + 2, a + 1 + 2 * n))
    redis.call('EXPIRE', result, ttl)
    redis.call('RPUSH', done, ARGV[a + 3])
    redis.call('EXPIRE', done, ttl)
    written = written + 1
  end
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  a = a + 2 + 2 * n
end
return written
"""


# KEYS: stream, the consumer's lease key. ARGV: group, consumer. Removes a consumer only while it
# holds no lease and no pending entry (deleting one with pending entries would lose them).
FORGET_CONSUMER_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One stream entry as handed to this worker."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


@dataclass(frozen=True)
class GroupStats:
    length: int
    lag: int
    pending: int


def _group_lost(exc: ResponseError) -> bool:
    """True when Redis lost the stream or group, e.g. after a restart without persistence."""
    message = str(exc)
    return "NOGROUP" in message or "no such key" in message


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Broker:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.consumer = settings.consumer
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
            socket_connect_timeout=settings.socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
        )
        self._settle = self.redis.register_script(SETTLE_SCRIPT)
        self._forget_consumer = self.redis.register_script(FORGET_CONSUMER_SCRIPT)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def _call(self, what: str, coro: Any) -> Any:
        """Await a Redis call; failures become BrokerError naming what was attempted."""
        try:
            return await coro
        except RedisError as exc:
            raise BrokerError(f"redis {what} failed: {exc}") from exc

    async def ensure_groups(self) -> None:
        """Create the consumer group on every priority stream (from id 0: earlier jobs count too)."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise BrokerError(f"cannot create group on {stream}: {exc}") from exc
            except RedisError as exc:
                raise BrokerError(f"cannot create group on {stream}: {exc}") from exc

    async def heartbeat(self) -> None:
        await self._call(
            "heartbeat", self.redis.set(self.keys.lease(self.consumer), b"1", px=int(self.settings.lease_s * 1000))
        )

    async def release(self) -> None:
        """Drop the lease so others may reclaim what this worker leaves pending at once; forget it if idle."""
        await self._call("release", self.redis.delete(self.keys.lease(self.consumer)))
        for stream in self.keys.streams:
            await self._forget(stream, self.consumer)

    async def _forget(self, stream: str, consumer: str) -> None:
        keys = [stream, self.keys.lease(consumer)]
        await self._call("forget consumer", self._forget_consumer(keys=keys, args=[self.settings.group, consumer]))

    async def read(self, count: int) -> list[Delivery]:
        """Up to ``count`` new entries, strictly by priority: a lower stream is read only when the
        higher ones have none left. Blocks up to block_ms when every stream is empty."""
        deliveries: list[Delivery] = []
        for stream in self.keys.streams:
            deliveries += await self._read_group({stream: ">"}, count - len(deliveries), block_ms=None)
            if len(deliveries) >= count:
                return deliveries
        if deliveries:
            return deliveries
        blocked = await self._read_group({s: ">" for s in self.keys.streams}, count, self.settings.block_ms)
        return sorted(blocked, key=lambda d: self.keys.priority_of(d.stream))

    async def _read_group(self, streams: dict[Any, Any], count: int, block_ms: int | None) -> list[Delivery]:
        try:
            reply = await self.redis.xreadgroup(self.settings.group, self.consumer, streams, count, block_ms)
        except ResponseError as exc:
            if _group_lost(exc):
                await self.ensure_groups()
                return []
            raise BrokerError(f"redis read failed: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"redis read failed: {exc}") from exc
        entries_by_stream: Any = reply or []  # RESP2: [[stream, [(entry id, fields), ...]], ...]
        return [
            Delivery(_text(stream), _text(entry_id), fields, 1)
            for stream, entries in entries_by_stream
            for entry_id, fields in entries
            if fields is not None
        ]

    async def reclaim(self, local_entry_ids: set[str]) -> list[Delivery]:
        """Claim entries of consumers whose lease expired, and this worker's own entries left for retry.

        Own entries still being worked on (``local_entry_ids``) are skipped. A claim by another
        worker resets an entry's idle time, so two reclaimers never both take the same entry.
        """
        lease_ms = int(self.settings.lease_s * 1000)
        claimed: list[Delivery] = []
        for stream in self.keys.streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream, self.settings.group)
            except ResponseError as exc:
                if _group_lost(exc):
                    await self.ensure_groups()
                    continue
                raise BrokerError(f"redis xinfo failed: {exc}") from exc
            except RedisError as exc:
                raise BrokerError(f"redis xinfo failed: {exc}") from exc
            for consumer in consumers:
                name = _text(consumer["name"])
                if name == self.consumer:
                    min_idle_ms = int(self.settings.retry_backoff_s * 1000)
                elif await self._call("exists", self.redis.exists(self.keys.lease(name))):
                    continue  # alive: never steal
                elif consumer["pending"] == 0:
                    await self._forget(stream, name)
                    continue
                else:
                    min_idle_ms = lease_ms // 2
                if consumer["pending"] == 0:
                    continue
                claimed += await self._claim(stream, name, min_idle_ms, local_entry_ids)
        return claimed

    async def _claim(self, stream: str, owner: str, min_idle_ms: int, skip: set[str]) -> list[Delivery]:
        pending = await self._call(
            "xpending",
            self.redis.xpending_range(
                stream, self.settings.group, "-", "+", self.settings.read_count, consumername=owner, idle=min_idle_ms
            ),
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        ids: list[Any] = [i for i in counts if i not in skip]
        if not ids:
            return []
        entries = await self._call(
            "xclaim", self.redis.xclaim(stream, self.settings.group, self.consumer, min_idle_ms, ids)
        )
        out = []
        for entry_id, fields in entries:
            entry = _text(entry_id)
            if not fields:  # the entry's payload is gone (deleted by hand): nothing to run
                await self._call("xack", self.redis.xack(stream, self.settings.group, entry))
                continue
            out.append(Delivery(stream, entry, fields, counts[entry] + 1))
        if out:
            logger.info("claimed %d entries of %s from %s", len(out), owner, stream)
        return out

    def _settle_call(self, settlements: Sequence[tuple[Delivery, JobResult]]) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.settings.result_ttl_s, self.settings.group]
        for delivery, result in settlements:
            keys += [delivery.stream, self.keys.result(result.job_id), self.keys.done(result.job_id)]
            fields = result.encode()
            args += [delivery.entry_id, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        return keys, args

    async def settle(
        self,
        settlements: Sequence[tuple[Delivery, JobResult]],
        dead_letters: Sequence[tuple[Delivery, JobResult]] = (),
    ) -> int:
        """Store results and acknowledge, in one atomic round trip; dead letters are copied first."""
        everything = [*dead_letters, *settlements]
        if not everything:
            return 0
        keys, args = self._settle_call(everything)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for delivery, result in dead_letters:
                    entry: dict[Any, Any] = {
                        "job_id": result.job_id,
                        "stream": delivery.stream,
                        "entry_id": delivery.entry_id,
                        "deliveries": delivery.deliveries - 1,
                        "code": result.code,
                        "message": result.message,
                        **{f"job.{_text(k)}": v for k, v in delivery.fields.items()},
                    }
                    pipe.xadd(self.keys.dead_letter, entry, maxlen=self.settings.dead_letter_maxlen, approximate=True)
                await self._settle(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"redis settle failed: {exc}") from exc
        return int(replies[-1])

    async def stats(self) -> dict[int, GroupStats]:
        out = {}
        for stream in self.keys.streams:
            length = await self._call("xlen", self.redis.xlen(stream))
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                groups = []
            except RedisError as exc:
                raise BrokerError(f"redis xinfo failed: {exc}") from exc
            group = next((g for g in groups if _text(g["name"]) == self.settings.group), None)
            lag = group.get("lag") if group else length
            pending = group["pending"] if group else 0
            out[self.keys.priority_of(stream)] = GroupStats(
                length, int(lag if lag is not None else length), int(pending)
            )
        return out

    async def backlog(self) -> int:
        """Entries not yet settled across all priorities (settled ones are deleted)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
            try:
                return sum(await pipe.execute())
            except RedisError as exc:
                raise BrokerError(f"redis xlen failed: {exc}") from exc
