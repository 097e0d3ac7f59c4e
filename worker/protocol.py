"""The wire format on Redis: key names, the versioned job entry and the result hash.

Everything a producer in another language needs is here and in docs/protocol.md. Jobs are flat
stream fields (binary-safe bytes, never pickle); results are a hash holding a JSON document plus
optional raw tensor bytes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from worker.errors import InvalidJobError

PROTOCOL_VERSION = 1
PRIORITIES = (0, 1, 2)  # 0 high, 1 normal (default), 2 low: one stream each
DEFAULT_PRIORITY = 1
JOB_ID_MAX_LEN = 200

Status = Literal["ok", "error"]

#: Adds a job unless its id was seen before. KEYS: seen key, stream. ARGV: seen ttl, field/value pairs.
#: Returns the new entry id, or nil for a duplicate id.
ENQUEUE_SCRIPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""


@dataclass(frozen=True)
class Keys:
    """Every Redis key this project uses, built from one prefix."""

    prefix: str = "imgworker"

    def stream(self, priority: int) -> str:
        return f"{self.prefix}:jobs:{priority}"

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.stream(p) for p in PRIORITIES)

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def job_id_of_done(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text.removeprefix(f"{self.prefix}:done:")

    def seen(self, job_id: str) -> str:
        return f"{self.prefix}:seen:{job_id}"

    def lease(self, consumer: str) -> str:
        return f"{self.prefix}:lease:{consumer}"

    def priority_of(self, stream: str) -> int:
        return int(stream.rsplit(":", 1)[1])


def new_job_id() -> str:
    return uuid.uuid4().hex


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
        """Parse a stream entry; anything malformed raises InvalidJobError with the reason."""
        version = _int_field(fields, "v", 0)
        if version != PROTOCOL_VERSION:
            raise InvalidJobError(f"unsupported protocol version {version}, this worker speaks {PROTOCOL_VERSION}")
        job_id = fields.get(b"id", b"").decode("utf-8", "replace")
        if not job_id or len(job_id) > JOB_ID_MAX_LEN:
            raise InvalidJobError(f"field id must be 1..{JOB_ID_MAX_LEN} characters")
        if b"image" not in fields:
            raise InvalidJobError("field image is missing")
        priority = _int_field(fields, "priority", DEFAULT_PRIORITY)
        deadline_ms = _int_field(fields, "deadline_ms", 0)
        enqueued_ms = _int_field(fields, "enqueued_ms", 0)
        want_tensors = _int_field(fields, "tensors", 0) != 0
        if priority not in PRIORITIES:
            raise InvalidJobError(f"priority must be one of {PRIORITIES}, got {priority}")
        return cls(
            job_id=job_id,
            image=fields[b"image"],
            priority=priority,
            deadline_ms=deadline_ms,
            enqueued_ms=enqueued_ms,
            want_tensors=want_tensors,
            source=fields.get(b"source", b"").decode("utf-8", "replace"),
        )


def _int_field(fields: dict[bytes, bytes], name: str, default: int) -> int:
    raw = fields.get(name.encode())
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidJobError(f"field {name} is not an integer: {raw[:40]!r}") from None


def job_id_of(fields: dict[bytes, bytes]) -> str:
    """The job id of an entry even when the rest is malformed, so its error result can be found."""
    return fields.get(b"id", b"").decode("utf-8", "replace")[:JOB_ID_MAX_LEN]


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

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> JobResult:
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
