"""Redis Streams adapter of the worker: read, lease, reclaim, charge, settle, dead-letter. Knows no backend.

Delivery guarantees:
- an entry is acknowledged only by the same Lua script call that stores its result (atomic), and
  deleted from the stream there too, so acknowledged entries never pile up in Redis memory;
- a result is written once: if a result already exists (a job settled by a worker whose lease was
  wrongly presumed dead), the second settle only acknowledges;
- a worker's pending entries are reclaimed by others only once its lease key has expired
  (heartbeat, not idle time alone); a worker retries its own failed entries after a backoff;
- attempts are charged fairly: an entry is charged when it fails, or when the worker that had
  *started* it dies (entries it had only read are not); past ``max_deliveries`` charged attempts
  the service dead-letters it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from worker.connection import broker_error, connect
from worker.protocol import (
    CHARGE_SCRIPT,
    FORGET_CONSUMER_SCRIPT,
    READ_SCRIPT,
    SETTLE_SCRIPT,
    Delivery,
    Keys,
    Settlement,
)
from worker.settings import RedisSettings

logger = logging.getLogger(__name__)


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


def _by_stream(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for delivery in deliveries:
        grouped[delivery.stream].append(delivery.entry_id)
    return grouped


class Broker:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.consumer = settings.consumer
        self.redis: aioredis.Redis = connect(settings)
        self._settle = self.redis.register_script(SETTLE_SCRIPT)
        self._forget_consumer = self.redis.register_script(FORGET_CONSUMER_SCRIPT)
        self._charge = self.redis.register_script(CHARGE_SCRIPT)
        self._read = self.redis.register_script(READ_SCRIPT)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def _call(self, what: str, coro: Any) -> Any:
        """Await a Redis call; failures become BrokerError (or ConfigError for refused credentials)."""
        try:
            return await coro
        except RedisError as exc:
            raise broker_error(what, exc, self.settings.url) from exc

    async def ensure_groups(self) -> None:
        """Create the consumer group on every priority stream (from id 0: earlier jobs count too)."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise broker_error(f"group creation on {stream}", exc, self.settings.url) from exc
            except RedisError as exc:
                raise broker_error(f"group creation on {stream}", exc, self.settings.url) from exc

    async def heartbeat(self) -> None:
        lease_ms = int(self.settings.lease_s * 1000)
        await self._call("heartbeat", self.redis.set(self.keys.lease(self.consumer), b"1", px=lease_ms))

    async def release(self) -> None:
        """Drop the lease so others may reclaim what this worker leaves pending at once; forget it if idle."""
        await self._call("release", self.redis.delete(self.keys.lease(self.consumer)))
        for stream in self.keys.streams:
            await self._forget(stream, self.consumer)

    async def _forget(self, stream: str, consumer: str) -> None:
        keys = [stream, self.keys.lease(consumer), self.keys.started(stream, consumer)]
        await self._call("forget consumer", self._forget_consumer(keys=keys, args=[self.settings.group, consumer]))

    async def read(self, count: int) -> list[Delivery]:
        """Up to ``count`` new entries, strictly by priority (a lower stream is read only when the
        higher ones have none left), marked started. Blocks up to block_ms when every stream is empty."""
        started = [self.keys.started(stream, self.consumer) for stream in self.keys.streams]
        try:
            reply = await self._read(
                keys=[*self.keys.streams, *started], args=[self.settings.group, self.consumer, count]
            )
        except ResponseError as exc:
            if _group_lost(exc):
                await self.ensure_groups()
                return []
            raise broker_error("read", exc, self.settings.url) from exc
        except RedisError as exc:
            raise broker_error("read", exc, self.settings.url) from exc
        deliveries = [
            Delivery(_text(stream), _text(entry_id), dict(zip(fields[::2], fields[1::2], strict=True)), 1)
            for stream, entries in reply
            for entry_id, fields in entries
            if fields
        ]
        if deliveries:
            return deliveries
        # Nothing queued: block on every stream at once (not possible in a script). COUNT applies to
        # each stream, so a share each keeps the total in bounds.
        share = max(count // len(self.keys.streams), 1)
        blocked = await self._read_group({s: ">" for s in self.keys.streams}, share, self.settings.block_ms)
        await self.mark_started(blocked)
        return sorted(blocked, key=lambda d: self.keys.priority_of(d.stream))

    async def _read_group(self, streams: dict[Any, Any], count: int, block_ms: int | None) -> list[Delivery]:
        try:
            reply = await self.redis.xreadgroup(self.settings.group, self.consumer, streams, count, block_ms)
        except ResponseError as exc:
            if _group_lost(exc):
                await self.ensure_groups()
                return []
            raise broker_error("read", exc, self.settings.url) from exc
        except RedisError as exc:
            raise broker_error("read", exc, self.settings.url) from exc
        entries_by_stream: Any = reply or []  # RESP2: [[stream, [(entry id, fields), ...]], ...]
        return [
            Delivery(_text(stream), _text(entry_id), fields, 1)
            for stream, entries in entries_by_stream
            for entry_id, fields in entries
            if fields is not None
        ]

    async def _pipelined(self, queue: Any) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            return list(await pipe.execute())

    async def mark_started(self, deliveries: Sequence[Delivery]) -> None:
        """Record that this worker started these entries: charged to them if it dies before settling.
        (``read`` marks what it returns; reclaimed entries are marked when they are admitted.)"""
        if deliveries:
            await self._call(
                "mark started",
                self._pipelined(
                    lambda pipe: [
                        pipe.sadd(self.keys.started(stream, self.consumer), *ids)
                        for stream, ids in _by_stream(deliveries).items()
                    ]
                ),
            )

    async def retry_later(self, failed: Sequence[tuple[Delivery, str]]) -> None:
        """Charge one failed attempt each (with its error) and leave them pending for a retry."""

        def queue(pipe: Any) -> None:
            for delivery, error in failed:
                attempts = self.keys.attempts(delivery.stream)
                pipe.hincrby(attempts, delivery.entry_id, 1)
                pipe.hset(attempts, f"{delivery.entry_id}:error", error[:1000])
                pipe.srem(self.keys.started(delivery.stream, self.consumer), delivery.entry_id)

        if failed:
            await self._call("charge attempts", self._pipelined(queue))

    async def last_error(self, delivery: Delivery) -> str | None:
        """Why the entry's last charged attempt ended, as recorded by whichever worker charged it."""
        raw = await self._call(
            "last error", self.redis.hget(self.keys.attempts(delivery.stream), f"{delivery.entry_id}:error")
        )
        return None if raw is None else _text(raw)

    async def unmark(self, deliveries: Sequence[Delivery]) -> None:
        """Left pending by a stop, not a failure: nothing to charge when others reclaim them."""
        if deliveries:
            await self._call(
                "unmark started",
                self._pipelined(
                    lambda pipe: [
                        pipe.srem(self.keys.started(stream, self.consumer), *ids)
                        for stream, ids in _by_stream(deliveries).items()
                    ]
                ),
            )

    async def reclaim(self, skip: set[str], limit: int) -> list[Delivery]:
        """Claim entries of consumers whose lease expired, and this worker's own entries left for retry.

        Own entries still being worked on (keys in ``skip``) are skipped. A claim resets an entry's
        idle time, so two reclaimers never both take the same entry.
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
                raise broker_error("xinfo", exc, self.settings.url) from exc
            except RedisError as exc:
                raise broker_error("xinfo", exc, self.settings.url) from exc
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
                claimed += await self._claim(stream, name, min_idle_ms, skip, limit - len(claimed))
                if len(claimed) >= limit:
                    return claimed
        return claimed

    async def _claim(self, stream: str, owner: str, min_idle_ms: int, skip: set[str], limit: int) -> list[Delivery]:
        pending = await self._call(
            "xpending",
            self.redis.xpending_range(
                stream, self.settings.group, "-", "+", limit, consumername=owner, idle=min_idle_ms
            ),
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        ids: list[Any] = [i for i in counts if f"{stream}/{i}" not in skip]
        if not ids:
            return []
        entries = await self._call(
            "xclaim", self.redis.xclaim(stream, self.settings.group, self.consumer, min_idle_ms, ids)
        )
        live = [(_text(entry_id), fields) for entry_id, fields in entries if fields]
        gone = [_text(entry_id) for entry_id, fields in entries if not fields]
        if gone:  # the entries' payloads were deleted by hand: nothing to run
            await self._call("xack", self.redis.xack(stream, self.settings.group, *gone))
        if not live:
            return []
        attempts = await self._call(
            "charge",
            self._charge(
                keys=[self.keys.attempts(stream), self.keys.started(stream, owner)], args=[e for e, _ in live]
            ),
        )
        if owner != self.consumer:
            logger.info("claimed %d entries of %s from %s", len(live), owner, stream)
        return [
            Delivery(stream, entry, fields, counts[entry] + 1, int(tried))
            for (entry, fields), tried in zip(live, attempts, strict=True)
        ]

    def _settle_call(self, settlements: Sequence[Settlement]) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.settings.result_ttl_s, self.settings.group]
        for s in settlements:
            stream, job_id = s.delivery.stream, s.result.job_id
            keys += [
                stream,
                self.keys.result(job_id),
                self.keys.done(job_id),
                self.keys.attempts(stream),
                self.keys.started(stream, self.consumer),
            ]
            args += [s.delivery.entry_id, s.result.status, len(s.fields)]
            for name, value in s.fields.items():
                args += [name, value]
        return keys, args

    async def settle(self, settlements: Sequence[Settlement], dead: bool = False) -> int:
        """Store results and acknowledge, in one atomic round trip; dead letters are copied first."""
        if not settlements:
            return 0
        keys, args = self._settle_call(settlements)
        try:
            if not dead:  # the hot path: one EVALSHA
                return int(await self._settle(keys=keys, args=args))
            async with self.redis.pipeline(transaction=True) as pipe:
                for s in settlements:
                    entry: dict[Any, Any] = {
                        "job_id": s.result.job_id,
                        "stream": s.delivery.stream,
                        "entry_id": s.delivery.entry_id,
                        "attempts": s.delivery.attempts,
                        "deliveries": s.delivery.deliveries - 1,
                        "code": s.result.code,
                        "message": s.result.message,
                        **{f"job.{_text(k)}": v for k, v in s.delivery.fields.items()},
                    }
                    pipe.xadd(self.keys.dead_letter, entry, maxlen=self.settings.dead_letter_maxlen, approximate=True)
                await self._settle(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        except RedisError as exc:
            raise broker_error("settle", exc, self.settings.url) from exc
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
                raise broker_error("xinfo", exc, self.settings.url) from exc
            group = next((g for g in groups if _text(g["name"]) == self.settings.group), None)
            lag = group.get("lag") if group else length
            pending = group["pending"] if group else 0
            out[self.keys.priority_of(stream)] = GroupStats(
                length, int(lag if lag is not None else length), int(pending)
            )
        return out

    async def backlog(self) -> int:
        """Entries not yet settled across all priorities (settled ones are deleted)."""
        return sum(
            await self._call("xlen", self._pipelined(lambda pipe: [pipe.xlen(stream) for stream in self.keys.streams]))
        )
