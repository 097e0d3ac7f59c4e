"""The wire format on Redis: key names, the versioned job entry, the result hash and the scripts.

Everything a producer in another language needs is here and in docs/protocol.md. Jobs are flat
stream fields (binary-safe bytes, never pickle); results are a hash holding a JSON document plus
optional raw tensor bytes.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from worker.core.errors import InvalidJobError

PROTOCOL_VERSION = 1
PRIORITIES = (0, 1, 2)  # 0 high, 1 normal (default), 2 low: one stream each
DEFAULT_PRIORITY = 1
JOB_ID_MAX_LEN = 200
#: the largest value an integer field may hold (Redis and every producer language agree on int64)
INT_FIELD_MAX = 2**63 - 1

Status = Literal["ok", "error"]
#: the code of a job whose result key holds something else than a result (a foreign or damaged key)
FOREIGN_RESULT_KEY = "foreign_result_key"

#: Jobs are refused once Redis holds this share of its maxmemory: the rest stays for what the
#: workers write (results, marks), so producers meet a clear refusal long before workers would.
ENQUEUE_MEMORY_FRACTION = 0.9

#: Between a stream's name and an entry id, the key of the image stored beside that entry.
IMAGE_KEY_INFIX = ":image:"
#: The scripts' twin of ``Keys.image``.
_IMAGE_KEY = f"""
local function image_key(stream, id) return stream .. '{IMAGE_KEY_INFIX}' .. id end
"""

#: Adds jobs, each unless its id was seen before. KEYS, two per job: seen key, stream.
#: ARGV: seen ttl, memory fraction (0: no check), then per job: field count n, n field/value pairs.
#: The ``image`` field is stored beside its entry (``<stream>:image:<entry id>``, see
#: ``IMAGE_KEY_INFIX``), the entry keeps the other fields: a worker's read then never passes the
#: image through Lua, which cost Redis ten times what the read itself does.
#: Returns per job the new entry id, or nil for a duplicate id. Refuses the whole call, storing
#: nothing, once Redis holds more than the fraction of its maxmemory, the call's own arguments
#: counted (an ``OOM`` error naming both figures); the shebang makes Redis itself refuse it
#: atomically at maxmemory.
ENQUEUE_SCRIPT = (
    "#!lua"
    + _IMAGE_KEY
    + """
local fraction = tonumber(ARGV[2])
if fraction > 0 then
  local info = redis.call('INFO', 'memory')
  local limit = tonumber(string.match(info, 'maxmemory:(%d+)'))
  if limit > 0 then
    local used = tonumber(string.match(info, 'used_memory:(%d+)'))  -- this call's images included
    if used > limit * fraction then
      return redis.error_reply(string.format(
        'OOM out of memory for new jobs: Redis uses %.1f MiB of its maxmemory %.1f MiB; jobs are refused above %d%%',
        used / 1048576, limit / 1048576, fraction * 100))
    end
  end
end
local out, a = {}, 3
for k = 1, #KEYS, 2 do
  local n = tonumber(ARGV[a])
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
    local fields, image = {}, nil
    for f = a + 1, a + 2 * n, 2 do
      if ARGV[f] == 'image' then
        image = ARGV[f + 1]
      else
        fields[#fields + 1] = ARGV[f]
        fields[#fields + 1] = ARGV[f + 1]
      end
    end
    local id = redis.call('XADD', KEYS[k + 1], '*', unpack(fields))
    if image then redis.call('SET', image_key(KEYS[k + 1], id), image) end
    out[#out + 1] = id
  else
    out[#out + 1] = false
  end
  a = a + 1 + 2 * n
end
return out
"""
)

#: The worker's scripts run at maxmemory too (``allow-oom``): settling deletes the entries that
#: fill Redis, so it is the one thing that must never be refused for lack of memory, and reading,
#: marking and charging are what lets it go on.
_WORKER_SCRIPT = "#!lua flags=allow-oom\n"

#: A Lua helper for scripts that pass many values to one command: unpack passes a few thousand at
#: most, so ``each_chunk(items, call)`` calls ``call`` with 1,000 at a time (an even count: HSET's
#: field/value pairs stay whole).
_EACH_CHUNK = """
local function each_chunk(items, call)
  for first = 1, #items, 1000 do call(unpack(items, first, math.min(first + 999, #items))) end
end
"""

#: Stores results and acknowledges, atomically, for a batch of jobs of one shard (one hash slot).
#: KEYS, six per job: stream, result hash, done list, attempts hash, running hash, dead-letter stream.
#: ARGV: result ttl, group, dead-letter maxlen, then per job: entry id, status, dead-letter field
#: count d (0: not dead-lettered), d field/value pairs, result field count n, n field/value pairs.
#: A result already stored (a hash with ``json``) is never overwritten: the second settle only
#: acknowledges. A result key holding anything else is not ours: it is left as it is, the job is
#: dead-lettered with code ``foreign_result_key`` and acknowledged. The entry and the image beside
#: it are deleted either way, so Redis holds only unfinished jobs. Returns {results written, [indexes (from
#: 1) of the jobs dead-lettered for a foreign key]}.
SETTLE_SCRIPT = (
    _WORKER_SCRIPT
    + _IMAGE_KEY
    + _EACH_CHUNK
    + """
local ttl, group, maxlen, a, written, foreign = ARGV[1], ARGV[2], ARGV[3], 4, 0, {}
-- per stream, what is acknowledged and deleted: one call per stream and command, not per job
local streams, order = {}, {}
local function forget(k, entry)
  local s = streams[KEYS[k]]
  if not s then
    s = {attempts = KEYS[k + 3], running = KEYS[k + 4], ids = {}, images = {}, fields = {}}
    streams[KEYS[k]] = s
    order[#order + 1] = KEYS[k]
  end
  s.ids[#s.ids + 1] = entry
  s.images[#s.images + 1] = image_key(KEYS[k], entry)
  s.fields[#s.fields + 1] = entry
  s.fields[#s.fields + 1] = entry .. ':error'
  s.fields[#s.fields + 1] = entry .. ':deaths'
end
for k = 1, #KEYS, 6 do
  local entry, status, d = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if d > 0 then
    redis.call('XADD', KEYS[k + 5], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, a, a + 2 * d - 1))
    a = a + 2 * d
  end
  local n = tonumber(ARGV[a])
  a = a + 1
  local kind = redis.call('TYPE', KEYS[k + 1])['ok']
  if kind == 'none' then
    redis.call('HSET', KEYS[k + 1], unpack(ARGV, a, a + 2 * n - 1))
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    local done = redis.call('TYPE', KEYS[k + 2])['ok']
    if done == 'none' or done == 'list' then  -- else not ours either: waiters find the result by looking
      redis.call('RPUSH', KEYS[k + 2], status)
      redis.call('EXPIRE', KEYS[k + 2], ttl)
    end
    written = written + 1
  elseif kind ~= 'hash' or redis.call('HEXISTS', KEYS[k + 1], 'json') == 0 then
    redis.call('XADD', KEYS[k + 5], 'MAXLEN', '~', maxlen, '*', 'stream', KEYS[k], 'entry_id', entry,
      'result_key', KEYS[k + 1], 'code', 'foreign_result_key',
      'message', 'the result key holds a ' .. kind .. ' that is not a result: left as it is, no result stored')
    foreign[#foreign + 1] = (k + 5) / 6
  end
  forget(k, entry)
  a = a + 2 * n
end
for _, stream in ipairs(order) do
  local s = streams[stream]
  each_chunk(s.ids, function(...) redis.call('XACK', stream, group, ...) end)
  each_chunk(s.ids, function(...) redis.call('XDEL', stream, ...) end)
  each_chunk(s.images, function(...) redis.call('DEL', ...) end)
  each_chunk(s.fields, function(...) redis.call('HDEL', s.attempts, ...) end)
  each_chunk(s.ids, function(...) redis.call('HDEL', s.running, ...) end)
end
return {written, foreign}
"""
)

#: Creates the consumer group on a stream (and the stream), from id 0; 0 if it exists already.
#: KEYS: the stream. ARGV: group.
ENSURE_GROUP_SCRIPT = (
    _WORKER_SCRIPT
    + """
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(reply) == 'table' and reply.err then
  if string.find(reply.err, 'BUSYGROUP') then return 0 end
  return reply
end
return 1
"""
)

#: Hands entries a stopping worker has not started back to their stream, as new entries (the same
#: fields and image, read by the next worker as if never read: nothing charged, delivered once),
#: and forgets the old ones. KEYS: the stream, the consumer's running hash. ARGV: group, entry ids. Returns
#: how many went back (an entry already settled or deleted has nothing to hand back).
HAND_BACK_SCRIPT = (
    _WORKER_SCRIPT
    + _IMAGE_KEY
    + """
local back = 0
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
  if entry then
    local id = redis.call('XADD', KEYS[1], '*', unpack(entry[2]))
    local image = image_key(KEYS[1], ARGV[i])
    if redis.call('EXISTS', image) == 1 then redis.call('RENAME', image, image_key(KEYS[1], id)) end
    back = back + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return back
"""
)

#: Refreshes a worker's lease. KEYS: the lease. ARGV: its time to live in ms.
HEARTBEAT_SCRIPT = _WORKER_SCRIPT + "return redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])\n"

#: Marks entries of one stream running (``batched`` or ``alone``) or waiting (the mark removed).
#: KEYS: the consumer's running hash. ARGV: count w of waiting entries, their ids, then entry id /
#: mark pairs.
MARK_SCRIPT = (
    _WORKER_SCRIPT
    + """
local w = tonumber(ARGV[1])
if w > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 2, w + 1)) end
if #ARGV > w + 1 then redis.call('HSET', KEYS[1], unpack(ARGV, w + 2)) end
return true
"""
)

#: Charges one failed attempt to each entry (with its error) and unmarks it, leaving it pending for a
#: retry. KEYS: attempts hash, the consumer's running hash (one stream). ARGV: entry id / error pairs.
RETRY_LATER_SCRIPT = (
    _WORKER_SCRIPT
    + """
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
  redis.call('HSET', KEYS[1], ARGV[i] .. ':error', ARGV[i + 1])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return true
"""
)

#: Removes a consumer only while it has no pending entry (deleting one with pending entries would
#: lose them); the caller checked that it holds no lease. KEYS: stream, the consumer's running hash.
#: ARGV: group, consumer.
FORGET_CONSUMER_SCRIPT = (
    _WORKER_SCRIPT
    + """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
)

#: Records the death of the consumer that was running these entries, then reports each entry's
#: attempts and deaths. KEYS: attempts hash, the previous owner's running hash. ARGV: entry ids.
#: A death charges an attempt only to an entry the owner ran alone: an entry that died in company
#: is a suspect (``:deaths``), not yet charged, and runs alone next. Entries the owner had only
#: read, or that were charged already when they failed, are not counted again.
CHARGE_SCRIPT = (
    _WORKER_SCRIPT
    + """
local out = {}
for i, id in ipairs(ARGV) do
  local how = redis.call('HGET', KEYS[2], id)
  if how then
    redis.call('HDEL', KEYS[2], id)
    redis.call('HINCRBY', KEYS[1], id .. ':deaths', 1)
    if how == 'alone' then
      redis.call('HINCRBY', KEYS[1], id, 1)
      redis.call('HSET', KEYS[1], id .. ':error', 'worker_died: the worker running it alone stopped unsettled')
    end
  end
  local attempts, deaths = redis.call('HGET', KEYS[1], id), redis.call('HGET', KEYS[1], id .. ':deaths')
  out[i] = {tonumber(attempts or '0'), tonumber(deaths or '0')}
end
return out
"""
)


#: Reads up to COUNT new entries strictly by priority and marks them running, in one round trip.
#: KEYS: the streams, highest priority first, then this consumer's running hash of each.
#: ARGV: group, consumer, count, bytes, largest. Reads up to ``count`` entries until their field
#: values and the images beside them add up to ``bytes``: in steps no larger than could fit if
#: every entry were ``largest`` bytes (the most an entry may hold), so the entry that crosses the
#: budget is the only one past it. Returns [[stream, [[entry id, [field, value, ...]], ...]], ...]:
#: the images beside entries stay where they are (``STRLEN`` counts them), for the caller to fetch.
READ_SCRIPT = (
    _WORKER_SCRIPT
    + _IMAGE_KEY
    + _EACH_CHUNK
    + """
local out, left, n = {}, tonumber(ARGV[3]), #KEYS / 2
local bytes, largest = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 1, n do
  if left <= 0 or bytes <= 0 then break end
  local entries, marks = {}, {}
  while left > 0 and bytes > 0 do
    local step = math.min(left, math.max(1, math.floor(bytes / largest)))
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', step, 'STREAMS', KEYS[i], '>')
    if not reply then break end
    for _, entry in ipairs(reply[1][2]) do
      marks[#marks + 1] = entry[1]
      marks[#marks + 1] = 'batched'
      for _, value in ipairs(entry[2] or {}) do bytes = bytes - #value end
      bytes = bytes - redis.call('STRLEN', image_key(KEYS[i], entry[1]))
      table.insert(entries, entry)
    end
    left = left - #reply[1][2]
  end
  each_chunk(marks, function(...) redis.call('HSET', KEYS[n + i], ...) end)
  if #entries > 0 then table.insert(out, {KEYS[i], entries}) end
end
return out
"""
)


@dataclass(frozen=True)
class Keys:
    """Every Redis key this project uses, built from one prefix.

    With ``shards`` > 1, or on Redis Cluster (``tagged``), every key a job touches carries its
    shard as a hash tag, ``imgworker:{3}:jobs:1``, so the scripts that touch them all run in one
    hash slot; a job's shard is CRC-32 of its id, modulo the shard count. One shard, untagged, is
    the plain layout ``imgworker:jobs:1`` of a single Redis instance.
    """

    prefix: str = "imgworker"
    shards: int = 1
    tagged: bool = False

    def _base(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}" if self.tagged else self.prefix

    def shard_of(self, job_id: str) -> int:
        """The shard whose streams and keys a job uses: CRC-32 (IEEE) of its UTF-8 id, mod shards."""
        return zlib.crc32(job_id.encode()) % self.shards if self.shards > 1 else 0

    def image(self, stream: str, entry_id: str) -> str:
        """String: the image of an entry whose fields hold none (the enqueue script puts it here);
        named after the stream, so it shares the stream's hash slot."""
        return f"{stream}{IMAGE_KEY_INFIX}{entry_id}"

    def stream(self, priority: int, shard: int = 0) -> str:
        return f"{self._base(shard)}:jobs:{priority}"

    def shard_streams(self, shard: int) -> tuple[str, ...]:
        """One shard's streams, highest priority first."""
        return tuple(self.stream(p, shard) for p in PRIORITIES)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(stream for shard in range(self.shards) for stream in self.shard_streams(shard))

    def shard_of_stream(self, stream: str) -> int:
        return int(stream.split("{", 1)[1].split("}", 1)[0]) if self.tagged else 0

    def dead_letter(self, shard: int = 0) -> str:
        return f"{self._base(shard)}:dead"

    def result(self, job_id: str, shard: int | None = None) -> str:
        """``shard``: where the worker stores it, the shard of the stream the job came from."""
        return f"{self._base(self.shard_of(job_id) if shard is None else shard)}:result:{job_id}"

    def done(self, job_id: str, shard: int | None = None) -> str:
        return f"{self._base(self.shard_of(job_id) if shard is None else shard)}:done:{job_id}"

    def job_id_of_done(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text.split(":done:", 1)[1]

    def seen(self, job_id: str) -> str:
        return f"{self._base(self.shard_of(job_id))}:seen:{job_id}"

    def lease(self, consumer: str) -> str:
        return f"{self.prefix}:lease:{consumer}"

    def attempts(self, stream: str) -> str:
        """Hash: entry id -> attempts that ended without a result (a failure, or the death of a
        worker running it alone), ``<entry id>:deaths`` -> deaths of workers running it, and
        ``<entry id>:error`` -> why the last attempt ended."""
        return f"{stream}:attempts"

    def running(self, stream: str, consumer: str) -> str:
        """Hash: entry id -> ``batched`` or ``alone``, for the entries a consumer is running and has
        not settled; should it die, each is counted as a death, charged only to one run alone."""
        return f"{stream}:running:{consumer}"

    def priority_of(self, stream: str) -> int:
        return int(stream.rsplit(":", 1)[1])


def now_ms() -> int:
    """Unix time in milliseconds: the clock of ``enqueued_ms``, ``deadline_ms`` and ``finished_ms``."""
    return int(time.time() * 1000)


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(raw: bytes | None) -> str | None:
    """The job id if it is 1..JOB_ID_MAX_LEN characters of valid UTF-8, else None: ids are never altered."""
    if not raw:
        return None
    try:
        job_id = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return job_id if len(job_id) <= JOB_ID_MAX_LEN else None


@dataclass(frozen=True)
class Delivery:
    """One stream entry as handed to this worker."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    #: times Redis handed the entry to a consumer (reads and claims)
    deliveries: int
    #: earlier attempts that ended without a result: failures, or the death of a worker running it alone
    attempts: int = 0
    #: deaths of workers running it, alone or along with other jobs
    deaths: int = 0

    @property
    def suspect(self) -> bool:
        """A worker died running it: it runs alone until it settles, so a death blames it alone."""
        return self.deaths > 0

    @property
    def key(self) -> str:
        """Unique across streams (entry ids are unique only within one)."""
        return f"{self.stream}/{self.entry_id}"

    @property
    def nbytes(self) -> int:
        """What holding it costs: its field values (the image, mostly), as the read script counts."""
        return sum(len(value) for value in self.fields.values())


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    image: bytes
    priority: int = DEFAULT_PRIORITY
    #: absolute deadline in Unix milliseconds; 0 means none
    deadline_ms: int = 0
    enqueued_ms: int = 0
    want_tensors: bool = False
    source: str = ""

    def encode(self) -> dict[str, bytes | str | int]:
        return {
            "v": PROTOCOL_VERSION,
            "id": self.job_id,
            "image": self.image,
            "priority": self.priority,
            "deadline_ms": self.deadline_ms,
            "enqueued_ms": self.enqueued_ms,
            "tensors": int(self.want_tensors),
            "source": self.source,
        }

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> JobRequest:
        """Parse a stream entry once; anything malformed raises InvalidJobError with the reason."""
        version = _int_field(fields, "v", 0)
        if version != PROTOCOL_VERSION:
            raise InvalidJobError(f"unsupported protocol version {version}, this worker speaks {PROTOCOL_VERSION}")
        job_id = valid_job_id(fields.get(b"id"))
        if job_id is None:
            raise InvalidJobError(f"field id must be 1..{JOB_ID_MAX_LEN} characters of UTF-8")
        if b"image" not in fields:
            raise InvalidJobError("field image is missing, and no image is stored beside the entry")
        priority = _int_field(fields, "priority", DEFAULT_PRIORITY)
        if priority not in PRIORITIES:
            raise InvalidJobError(f"priority must be one of {PRIORITIES}, got {priority}")
        return cls(
            job_id=job_id,
            image=fields[b"image"],
            priority=priority,
            deadline_ms=_int_field(fields, "deadline_ms", 0),
            enqueued_ms=_int_field(fields, "enqueued_ms", 0),
            want_tensors=_int_field(fields, "tensors", 0) != 0,
            source=fields.get(b"source", b"")[:1000].decode("utf-8", "replace"),
        )


def _int_field(fields: dict[bytes, bytes], name: str, default: int) -> int:
    raw = fields.get(name.encode())
    if raw is None:
        return default
    # Checked before int(): a field of thousands of digits is malformed, not a slow conversion.
    if len(raw) > 20 or not raw.strip().lstrip(b"+-").isdigit():
        raise InvalidJobError(f"field {name} is not an integer: {raw[:40]!r}")
    value = int(raw)
    if not 0 <= value <= INT_FIELD_MAX:
        raise InvalidJobError(f"field {name} must be between 0 and {INT_FIELD_MAX}, got {value}")
    return value


@dataclass
class JobResult:
    job_id: str
    status: Status
    code: str = ""
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, npt.NDArray[Any]] = field(default_factory=dict)

    @classmethod
    def failure(cls, job_id: str, code: str, message: str) -> JobResult:
        return cls(job_id=job_id, status="error", code=code, message=message)

    @classmethod
    def success(
        cls,
        job_id: str,
        *,
        boxes: list[dict[str, Any]],
        image: tuple[int, int],
        model_input: tuple[int, int, int, int],
        run: dict[str, Any],
        tensors: dict[str, npt.NDArray[Any]],
    ) -> JobResult:
        """The whole body of a result, built here only (docs/protocol.md lists its fields).
        ``image``: the original (height, width); ``model_input``: (height, width, padded height,
        padded width); ``run``: bucket, batch_size, model, deliveries, attempts, timings_ms,
        finished_ms, worker."""
        height, width, padded_height, padded_width = model_input
        body = {
            "boxes": boxes,
            "image": {"height": image[0], "width": image[1]},
            "input": {"height": height, "width": width, "padded_height": padded_height, "padded_width": padded_width},
            **run,
        }
        return cls(job_id=job_id, status="ok", result=body, tensors=tensors)

    def document(self) -> dict[str, Any]:
        """The JSON document stored in the hash field ``json``."""
        return {
            "v": PROTOCOL_VERSION,
            "id": self.job_id,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "result": self.result,
            "tensors": {
                name: {"dtype": str(arr.dtype), "shape": list(arr.shape), "field": f"tensor:{name}"}
                for name, arr in self.tensors.items()
            },
        }

    def encode(self) -> dict[str, bytes]:
        fields = {"status": self.status.encode(), "json": json.dumps(self.document()).encode()}
        for name, arr in self.tensors.items():
            fields[f"tensor:{name}"] = np.ascontiguousarray(arr).tobytes()
        return fields

    def settlement(self, delivery: Delivery, bucket: str = "none", enqueued_ms: int = 0) -> Settlement:
        """Encoded once, where it is built (a worker thread, not the event loop)."""
        return Settlement(delivery, self, self.encode(), bucket, enqueued_ms)

    @classmethod
    def decode(cls, fields: dict[bytes, bytes], job_id: str = "") -> JobResult:
        """The stored result; a hash that is not one (no valid ``json``: written by someone else, or
        damaged) becomes a ``foreign_result_key`` error for ``job_id``, never an exception."""
        try:
            doc = json.loads(fields[b"json"])
            tensors = {
                name: np.frombuffer(fields[meta["field"].encode()], dtype=meta["dtype"]).reshape(meta["shape"])
                for name, meta in doc.get("tensors", {}).items()
            }
            return cls(
                job_id=doc["id"],
                status=doc["status"],
                code=doc.get("code", ""),
                message=doc.get("message", ""),
                result=doc.get("result", {}),
                tensors=tensors,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return cls.failure(job_id, FOREIGN_RESULT_KEY, f"the result hash is not a result ({reason}); left as it is")


@dataclass(frozen=True)
class Settlement:
    """A final result for one delivery, encoded for the settle script."""

    delivery: Delivery
    result: JobResult
    fields: dict[str, bytes]
    #: for metrics: the bucket that ran the job ("none" if it never reached one), its enqueue time
    bucket: str = "none"
    enqueued_ms: int = 0
