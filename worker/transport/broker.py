"""Redis Streams adapter of the worker: read, lease, reclaim, charge, settle, dead-letter. Knows no backend.

Delivery guarantees:
- an entry is acknowledged only by the same Lua script call that stores its result (atomic), and
  deleted from the stream there too, so acknowledged entries never pile up in Redis memory;
- a result is written once: if a result already exists (a job settled by a worker whose lease was
  wrongly presumed dead), the second settle only acknowledges;
- a worker's pending entries are reclaimed by others only once its lease key has expired
  (heartbeat, not idle time alone); a worker retries its own failed entries after a backoff;
- attempts are charged fairly: an entry is charged when it fails, or when the worker running it
  *alone* dies; a death with other entries running makes each a suspect, run alone next (entries
  it had only read count nothing); past ``max_deliveries`` charged attempts the service
  dead-letters it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from worker.core.protocol import (
    CHARGE_SCRIPT,
    ENSURE_GROUP_SCRIPT,
    FORGET_CONSUMER_SCRIPT,
    HAND_BACK_SCRIPT,
    HEARTBEAT_SCRIPT,
    MARK_SCRIPT,
    PRIORITIES,
    READ_SCRIPT,
    RETRY_LATER_SCRIPT,
    SETTLE_SCRIPT,
    Delivery,
    Settlement,
)
from worker.core.settings import RedisSettings
from worker.transport.connection import PROBE_TIMEOUT_S, broker_error, connect, keys_for, mapped

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    """What a settle call did: results written, and settlements whose result key was not ours
    (dead-lettered with ``foreign_result_key``, no result stored)."""

    written: int
    foreign: list[Settlement]


@dataclass(frozen=True)
class GroupStats:
    length: int
    lag: int
    pending: int


#: (stream, entry id, fields) of entries read
Entries = list[tuple[str, str, dict[bytes, bytes]]]


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
        self.keys = keys_for(settings)
        self.consumer = settings.consumer
        self.redis: Any = connect(settings)  # Redis, or RedisCluster: the same commands
        self._probe: Any = connect(settings, probe=True)  # its own connection: never queued behind reads
        self._next_shard = 0
        self._settle = self.redis.register_script(SETTLE_SCRIPT)
        self._forget_consumer = self.redis.register_script(FORGET_CONSUMER_SCRIPT)
        self._charge = self.redis.register_script(CHARGE_SCRIPT)
        self._read = self.redis.register_script(READ_SCRIPT)
        self._heartbeat = self.redis.register_script(HEARTBEAT_SCRIPT)
        self._hand_back = self.redis.register_script(HAND_BACK_SCRIPT)
        self._ensure_group = self.redis.register_script(ENSURE_GROUP_SCRIPT)
        self._mark = self.redis.register_script(MARK_SCRIPT)
        self._retry_later = self.redis.register_script(RETRY_LATER_SCRIPT)

    async def aclose(self) -> None:
        await self.redis.aclose()
        await self._probe.aclose()

    async def answers(self) -> bool:
        """Whether Redis answers a PING within PROBE_TIMEOUT_S: what readiness means."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                return bool(await self._probe.ping())
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            return False

    async def _call(self, what: str, coro: Any) -> Any:
        """Await a Redis call; failures become BrokerError (or ConfigError for refused credentials)."""
        with mapped(what, self.settings.url):
            return await coro

    async def _unless_group_lost(self, what: str, coro: Any) -> Any:
        """Like ``_call``, but when Redis lost the stream or group (a restart without persistence)
        the groups are made again and the answer is None."""
        with mapped(what, self.settings.url):
            try:
                return await coro
            except ResponseError as exc:
                if not _group_lost(exc):
                    raise
        await self.ensure_groups()
        return None

    async def ensure_groups(self) -> None:
        """Create the consumer group on every priority stream (from id 0: earlier jobs count too)."""
        for stream in self.keys.streams:
            await self._call(
                f"group creation on {stream}", self._ensure_group(keys=[stream], args=[self.settings.group])
            )

    async def heartbeat(self) -> None:
        lease_ms = int(self.settings.lease_s * 1000)
        await self._call("heartbeat", self._heartbeat(keys=[self.keys.lease(self.consumer)], args=[lease_ms]))

    async def release(self) -> None:
        """Drop the lease so others may reclaim what this worker leaves pending at once; forget it if idle."""
        await self._call("release", self.redis.delete(self.keys.lease(self.consumer)))
        for stream in self.keys.streams:
            await self._forget(stream, self.consumer)

    async def _forget(self, stream: str, consumer: str) -> None:
        """Remove a consumer without a lease from a stream's group, unless entries are pending on it."""
        keys = [stream, self.keys.running(stream, consumer)]
        await self._call("forget consumer", self._forget_consumer(keys=keys, args=[self.settings.group, consumer]))

    async def read(self, count: int, nbytes: int, largest: int) -> list[Delivery]:
        """Up to ``count`` queued entries, marked running, until they hold ``nbytes``: the entry that
        crosses it is the only one past it, if no entry holds more than ``largest``. Within a shard,
        strictly by priority (a lower stream is read only when the higher ones have none left);
        shards take turns. Returns at once, empty when nothing is queued."""
        shards = self.keys.shards
        first = self._take_turn()
        deliveries: list[Delivery] = []
        for shard in [(first + i) % shards for i in range(shards)]:
            left = nbytes - sum(d.nbytes for d in deliveries)
            deliveries += await self._read_shard(shard, count - len(deliveries), left, largest)
            if len(deliveries) >= count or left <= 0:
                break
        return deliveries

    async def wait_for_entries(self) -> list[Delivery]:
        """Block up to block_ms for the next entry of any priority, marked running: one entry of
        each stream at most (a blocking read cannot run in a script, and on a cluster cannot span
        slots, so it cannot count bytes); ``read`` takes the rest."""
        block_ms = max(self.settings.block_ms // self.keys.shards, 10)
        blocked = await self._read_group({s: ">" for s in self.keys.shard_streams(self._take_turn())}, 1, block_ms)
        await self.mark(running=blocked)
        return sorted(blocked, key=lambda d: self.keys.priority_of(d.stream))

    def _take_turn(self) -> int:
        """The shard a read starts with: shards take turns."""
        first, self._next_shard = self._next_shard, (self._next_shard + 1) % self.keys.shards
        return first

    async def _read_shard(self, shard: int, count: int, nbytes: int, largest: int) -> list[Delivery]:
        streams = self.keys.shard_streams(shard)
        running = [self.keys.running(stream, self.consumer) for stream in streams]
        args = [self.settings.group, self.consumer, count, nbytes, largest]
        reply = await self._unless_group_lost("read", self._read(keys=[*streams, *running], args=args))
        entries = [
            (_text(stream), _text(entry_id), dict(zip(fields[::2], fields[1::2], strict=True)))
            for stream, stream_entries in reply or []
            for entry_id, fields in stream_entries
            if fields
        ]
        await self._fetch_images(entries)
        return [Delivery(stream, entry_id, fields, 1) for stream, entry_id, fields in entries]

    async def _read_group(self, streams: dict[Any, Any], count: int, block_ms: int | None) -> list[Delivery]:
        """A plain XREADGROUP of streams of one shard."""
        reply = await self._unless_group_lost(
            "read", self.redis.xreadgroup(self.settings.group, self.consumer, streams, count, block_ms)
        )
        entries_by_stream: Any = reply or []  # RESP2: [[stream, [(entry id, fields), ...]], ...]
        entries = [
            (_text(stream), _text(entry_id), fields)
            for stream, stream_entries in entries_by_stream
            for entry_id, fields in stream_entries
            if fields is not None
        ]
        await self._fetch_images(entries)
        return [Delivery(stream, entry_id, fields, 1) for stream, entry_id, fields in entries]

    async def _fetch_images(self, entries: Entries) -> None:
        """Put each entry's image among its fields (entries of one shard: one hash slot): those
        whose image is stored beside them get it with one MGET. An entry whose image is gone keeps
        none (it fails as an invalid job)."""
        beside = [i for i, (_, _, fields) in enumerate(entries) if b"image" not in fields]
        if not beside:
            return
        images = await self._call(
            "image fetch", self.redis.mget([self.keys.image(entries[i][0], entries[i][1]) for i in beside])
        )
        for i, image in zip(beside, images, strict=True):
            if image is not None:
                entries[i][2][b"image"] = image

    async def _pipelined(self, queue: Any, raise_on_error: bool = True) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            return list(await pipe.execute(raise_on_error=raise_on_error))

    async def mark(self, running: Sequence[Delivery] = (), waiting: Sequence[Delivery] = ()) -> None:
        """Which entries this worker is running (a death counts against them) and which only wait.

        An entry counts as running while it decodes and from the moment its batch takes a lane
        until it is settled; decoded and queued for a lane, it waits: a death then counts nothing.
        A suspect runs alone (the service sees to it), so a death then charges it an attempt.
        (``read`` marks what it returns as running, atomically with the read.)
        """
        marks: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for delivery in waiting:
            marks[delivery.stream][0].append(delivery.entry_id)
        for delivery in running:
            marks[delivery.stream][1].extend([delivery.entry_id, "alone" if delivery.suspect else "batched"])

        if marks:  # a script call per stream, concurrently (scripts cannot go in a cluster pipeline)
            calls = [
                self._mark(keys=[self.keys.running(stream, self.consumer)], args=[len(unmarked), *unmarked, *marked])
                for stream, (unmarked, marked) in marks.items()
            ]
            await self._call("mark running", asyncio.gather(*calls))

    async def hand_back(self, deliveries: Sequence[Delivery]) -> int:
        """Entries never started go back to their streams for other workers, as if never read."""
        calls = [
            self._hand_back(keys=[stream, self.keys.running(stream, self.consumer)], args=[self.settings.group, *ids])
            for stream, ids in _by_stream(deliveries).items()
        ]
        return sum(await self._call("hand back", asyncio.gather(*calls)))

    async def retry_later(self, failed: Sequence[tuple[Delivery, str]]) -> None:
        """Charge one failed attempt each (with its error) and leave them pending for a retry."""
        by_stream: dict[str, list[str]] = defaultdict(list)
        for delivery, error in failed:
            by_stream[delivery.stream] += [delivery.entry_id, error[:1000]]
        if by_stream:
            calls = [
                self._retry_later(keys=[self.keys.attempts(s), self.keys.running(s, self.consumer)], args=args)
                for s, args in by_stream.items()
            ]
            await self._call("charge attempts", asyncio.gather(*calls))

    async def last_error(self, delivery: Delivery) -> str | None:
        """Why the entry's last charged attempt ended, as recorded by whichever worker charged it."""
        raw = await self._call(
            "last error", self.redis.hget(self.keys.attempts(delivery.stream), f"{delivery.entry_id}:error")
        )
        return None if raw is None else _text(raw)

    async def reclaim(self, skip: set[str], limit: int) -> list[Delivery]:
        """Claim entries of consumers whose lease expired, and this worker's own entries left for retry.

        Own entries still being worked on (keys in ``skip``) are skipped. A claim resets an entry's
        idle time, so two reclaimers never both take the same entry. Every stream's consumers,
        their leases and their idle entries are read in one pipeline each (one round trip per
        node): one call per stream and consumer would cost streams x consumers round trips, 1,200
        on 12 shards with 32 workers, and it runs on the intake path every few seconds.
        """
        group, streams = self.settings.group, self.keys.streams
        replies = await self._unless_group_lost(
            "xinfo", self._pipelined(lambda pipe: [pipe.xinfo_consumers(s, group) for s in streams])
        )
        if replies is None:
            return []
        others = sorted({_text(c["name"]) for consumers in replies for c in consumers} - {self.consumer})
        leases = await self._call(
            "exists", self._pipelined(lambda pipe: [pipe.exists(self.keys.lease(name)) for name in others])
        )
        alive = {name for name, exists in zip(others, leases, strict=True) if exists}
        lease_ms = int(self.settings.lease_s * 1000)
        candidates: list[tuple[str, str, int]] = []  # (stream, owner, min idle ms)
        for stream, consumers in zip(streams, replies, strict=True):
            for consumer in consumers:
                name = _text(consumer["name"])
                if name in alive:
                    continue  # alive: never steal
                if name != self.consumer and consumer["pending"] == 0:
                    await self._forget(stream, name)  # no lease: it cannot come back under this name
                elif consumer["pending"]:
                    own = name == self.consumer
                    candidates.append(
                        (stream, name, int(self.settings.retry_backoff_s * 1000) if own else lease_ms // 2)
                    )
        if not candidates:
            return []
        pending = await self._call(
            "xpending",
            self._pipelined(
                lambda pipe: [
                    pipe.xpending_range(stream, group, "-", "+", limit, consumername=owner, idle=min_idle_ms)
                    for stream, owner, min_idle_ms in candidates
                ]
            ),
        )
        claimed: list[Delivery] = []
        for (stream, owner, min_idle_ms), idle in zip(candidates, pending, strict=True):
            if idle:
                claimed += await self._claim(stream, owner, min_idle_ms, idle, skip=skip, limit=limit - len(claimed))
            if len(claimed) >= limit:
                break
        return claimed

    async def _claim(
        self, stream: str, owner: str, min_idle_ms: int, idle: list[dict[str, Any]], *, skip: set[str], limit: int
    ) -> list[Delivery]:
        """Claim ``owner``'s idle entries of ``stream`` (XPENDING's answer), charging what its death cost."""
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in idle}
        ids: list[Any] = [i for i in counts if f"{stream}/{i}" not in skip][:limit]
        if not ids:
            return []
        entries = await self._call(
            "xclaim", self.redis.xclaim(stream, self.settings.group, self.consumer, min_idle_ms, ids)
        )
        live = [(_text(entry_id), fields) for entry_id, fields in entries if fields]
        gone = [_text(entry_id) for entry_id, fields in entries if not fields]
        if gone:  # the entries' payloads were deleted by hand: nothing to run, nor to keep their images for
            await self._call("xack", self.redis.xack(stream, self.settings.group, *gone))
            await self._call("image delete", self.redis.delete(*(self.keys.image(stream, e) for e in gone)))
        if not live:
            return []
        await self._fetch_images([(stream, entry, fields) for entry, fields in live])
        counts_by_entry = await self._call(
            "charge",
            self._charge(
                keys=[self.keys.attempts(stream), self.keys.running(stream, owner)], args=[e for e, _ in live]
            ),
        )
        if owner != self.consumer:
            logger.info("claimed %d entries of %s from %s", len(live), owner, stream)
        return [
            Delivery(stream, entry, fields, counts[entry] + 1, int(attempts), int(deaths))
            for (entry, fields), (attempts, deaths) in zip(live, counts_by_entry, strict=True)
        ]

    def _settle_call(self, settlements: Sequence[Settlement], dead: bool) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.settings.result_ttl_s, self.settings.group, self.settings.dead_letter_maxlen]
        for s in settlements:
            stream, job_id = s.delivery.stream, s.result.job_id
            shard = self.keys.shard_of_stream(stream)
            keys += [
                stream,
                self.keys.result(job_id, shard),
                self.keys.done(job_id, shard),
                self.keys.attempts(stream),
                self.keys.running(stream, self.consumer),
                self.keys.dead_letter(shard),
            ]
            args += [s.delivery.entry_id, s.result.status]
            if dead:
                entry: dict[str, Any] = {
                    "job_id": job_id,
                    "stream": stream,
                    "entry_id": s.delivery.entry_id,
                    "attempts": s.delivery.attempts,
                    "deaths": s.delivery.deaths,
                    "deliveries": s.delivery.deliveries - 1,
                    "code": s.result.code,
                    "message": s.result.message,
                    **{f"job.{_text(k)}": v for k, v in s.delivery.fields.items()},
                }
                args.append(len(entry))
                for name, value in entry.items():
                    args += [name, value]
            else:
                args.append(0)
            args.append(len(s.fields))
            for name, value in s.fields.items():
                args += [name, value]
        return keys, args

    async def settle(self, settlements: Sequence[Settlement], dead: bool = False) -> Settled:
        """Store results and acknowledge (dead letters copied first), atomically: one script call
        per shard, so every key it touches is in one hash slot."""
        by_shard: dict[int, list[Settlement]] = defaultdict(list)
        for s in settlements:
            by_shard[self.keys.shard_of_stream(s.delivery.stream)].append(s)
        written, foreign = 0, []
        for group in by_shard.values():
            keys, args = self._settle_call(group, dead)
            count, foreign_indexes = await self._call("settle", self._settle(keys=keys, args=args))
            written += int(count)
            foreign += [group[int(i) - 1] for i in foreign_indexes]
        return Settled(written, foreign)

    async def stats(self) -> dict[int, GroupStats]:
        """Per priority, summed over the shards: unfinished entries, entries not read yet, pending.
        One pipeline (a round trip per node) whatever the number of shards."""
        totals = {p: GroupStats(0, 0, 0) for p in PRIORITIES}
        streams = self.keys.streams

        def queue(pipe: Any) -> None:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)

        replies = await self._call("stats", self._pipelined(queue, raise_on_error=False))
        for stream, length, groups_or_error in zip(streams, replies[::2], replies[1::2], strict=True):
            if isinstance(length, ResponseError):
                raise broker_error("xlen", length, self.settings.url)
            # a stream that is gone has no group either
            groups = [] if isinstance(groups_or_error, ResponseError) else groups_or_error
            group = next((g for g in groups if _text(g["name"]) == self.settings.group), None)
            lag = group.get("lag") if group else length
            pending = group["pending"] if group else 0
            before = totals[self.keys.priority_of(stream)]
            totals[self.keys.priority_of(stream)] = GroupStats(
                before.length + length,
                before.lag + int(lag if lag is not None else length),
                before.pending + int(pending),
            )
        return totals

    async def backlog(self) -> int:
        """Entries not yet settled across all priorities (settled ones are deleted)."""
        return sum(
            await self._call("xlen", self._pipelined(lambda pipe: [pipe.xlen(stream) for stream in self.keys.streams]))
        )
