from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from worker.core.errors import ConfigError, InvalidJobError
from worker.core.protocol import PROTOCOL_VERSION, JobRequest, JobResult, Keys, valid_job_id
from worker.core.settings import Settings, usable_cores
from worker.supervisor import decode_threads_each


def _wire(fields: dict[str, bytes | str | int]) -> dict[bytes, bytes]:
    """What redis-py hands back for an entry written with these fields."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_job_round_trip_keeps_binary_image_bytes() -> None:
    image = bytes(range(256)) * 3 + b"\x00\r\n"
    job = JobRequest("job-1", image, priority=0, deadline_ms=123, enqueued_ms=100, want_tensors=True, source="a.jpg")
    assert JobRequest.decode(_wire(job.encode())) == job


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"v": 2, "id": "a", "image": b"x"}, "unsupported protocol version 2"),
        ({"v": "x", "id": "a", "image": b"x"}, "field v is not an integer"),
        ({"v": 1, "image": b"x"}, "field id"),
        ({"v": 1, "id": "a" * 201, "image": b"x"}, "field id"),
        ({"v": 1, "id": b"\xff\xfe-not-utf8", "image": b"x"}, "field id"),
        ({"v": 1, "id": "a", "image": b"x", "enqueued_ms": "9" * 5000}, "field enqueued_ms is not an integer"),
        ({"v": 1, "id": "a", "image": b"x", "deadline_ms": -5}, "field deadline_ms must be between"),
        ({"v": 1, "id": "a", "image": b"x", "enqueued_ms": 2**63}, "field enqueued_ms must be between"),
        ({"v": 1, "id": "a"}, "image is missing"),
        ({"v": 1, "id": "a", "image": b"x", "priority": 7}, "priority must be one of"),
        ({"v": 1, "id": "a", "image": b"x", "deadline_ms": "soon"}, "field deadline_ms is not an integer"),
    ],
)
def test_malformed_entries_raise_invalid_job(fields: dict[str, bytes | str | int], message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        JobRequest.decode(_wire(fields))


def test_job_ids_are_never_altered() -> None:
    """Valid ids come back byte for byte; anything else is None (the entry id stands in), never a repair."""
    assert valid_job_id("ordre-№42 ✓".encode()) == "ordre-№42 ✓"
    assert valid_job_id(("é" * 200).encode()) == "é" * 200  # 200 characters, 400 bytes: fine
    assert valid_job_id(("é" * 201).encode()) is None
    assert valid_job_id(b"abc\xff") is None
    assert valid_job_id(b"") is None and valid_job_id(None) is None


def test_result_round_trip_with_raw_tensors() -> None:
    tensor = np.random.default_rng(0).random((1, 64, 96), dtype=np.float32)
    result = JobResult("j", "ok", result={"boxes": []}, tensors={"sigmoid_0.tmp_0": tensor})
    fields = {k.encode(): v for k, v in result.encode().items()}
    doc = json.loads(fields[b"json"])
    assert doc["v"] == PROTOCOL_VERSION and doc["tensors"]["sigmoid_0.tmp_0"]["shape"] == [1, 64, 96]
    decoded = JobResult.decode(fields)
    assert decoded.status == "ok" and decoded.result == {"boxes": []}
    np.testing.assert_array_equal(decoded.tensors["sigmoid_0.tmp_0"], tensor)


def test_sharded_keys_keep_every_key_of_a_job_in_its_shards_hash_slot() -> None:
    keys = Keys("p", shards=8, tagged=True)
    shard = keys.shard_of("order-42")
    assert shard == zlib.crc32(b"order-42") % 8  # any producer language can compute it
    stream = keys.stream(1, shard)
    tag = f"{{{shard}}}"
    assert stream == f"p:{tag}:jobs:1" and keys.shard_of_stream(stream) == shard
    for key in (keys.seen("order-42"), keys.result("order-42"), keys.done("order-42"), keys.attempts(stream)):
        assert tag in key, key
    assert keys.job_id_of_done(keys.done("order-42")) == "order-42"
    assert len(keys.streams) == 8 * 3 and keys.dead_letter(shard) == f"p:{tag}:dead"
    assert Keys("p").stream(1) == "p:jobs:1"  # one shard, untagged: the single-instance layout


def test_keys_share_one_prefix() -> None:
    keys = Keys("p")
    assert keys.attempts(keys.stream(1)) == "p:jobs:1:attempts"
    assert keys.running(keys.stream(1), "w") == "p:jobs:1:running:w"
    assert keys.streams == ("p:jobs:0", "p:jobs:1", "p:jobs:2")
    assert keys.priority_of(keys.stream(2)) == 2
    assert keys.job_id_of_done(keys.done("abc").encode()) == "abc"
    assert {keys.result("a"), keys.dead_letter(), keys.lease("c"), keys.seen("a")} == {
        "p:result:a",
        "p:dead",
        "p:lease:c",
        "p:seen:a",
    }


def test_settings_read_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGWORKER_REDIS__LEASE_S", "12.5")
    monkeypatch.setenv("IMGWORKER_BACKEND__TENSORRT__INSTANCES", "2")
    settings = Settings.load(redis={"url": "redis://example:1/0"})
    assert settings.redis.lease_s == 12.5 and settings.redis.url == "redis://example:1/0"
    assert settings.backend.tensorrt.instances == 2


def test_settings_read_dotenv(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text("IMGWORKER_REDIS__MAX_DELIVERIES=7\n")
    monkeypatch.chdir(tmp_path)
    assert Settings.load().redis.max_deliveries == 7


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("IMGWORKER_REDIS__LEASE_S", "-1", "redis.lease_s"),
        ("IMGWORKER_METRICS__PORT", "http", "metrics.port"),
        ("IMGWORKER_BACKEND__TENSORRT__OPTIMIZATION_LEVEL", "9", "backend.tensorrt.optimization_level"),
        ("IMGWORKER_REDIS__BLOCK_MS", "60000", "block_ms must be shorter"),
        ("IMGWORKER_REDIS__URL", "http://127.0.0.1:6379", "redis.url"),
        ("IMGWORKER_REDIS__URL", "redis://127.0.0.1:notaport/0", "redis.url"),
        ("IMGWORKER_LOG_LEVEL", "chatty", "log_level"),
    ],
)
def test_invalid_settings_name_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Settings.load()


def test_secrets_stay_out_of_settings_errors_and_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.transport.connection import redact

    monkeypatch.setenv("IMGWORKER_REDIS__URL", "redis://user:hunter2@127.0.0.1:99999/0")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert "hunter2" not in str(info.value) and "redis.url" in str(info.value)
    assert redact("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("rediss://:hunter2@host/0") == "rediss://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_decode_threads_follow_the_cores_a_process_may_use_not_the_machines() -> None:
    """taskset or a cpuset pins a worker to fewer cores than os.cpu_count(): threads follow the pin."""
    one_core = min(os.sched_getaffinity(0))
    probe = (
        f"import os; os.sched_setaffinity(0, {{{one_core}}}); "
        "from worker.core.settings import Settings, usable_cores; from worker.supervisor import decode_threads_each; "
        "print(usable_cores(), Settings.load().pipeline.decode_threads, decode_threads_each(4))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "2"]  # a worker alone gets its core; supervised ones two threads at least
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    assert decode_threads_each(1) == max(2, usable_cores())


def test_settings_handed_to_a_child_process_read_back_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor passes settings to its children as environment variables: what each child
    reads must be what the parent meant, lists and booleans included."""
    from worker.core.settings import environment

    tensorrt = {"fp16": True, "tactic_sources": ["EDGE_MASK_CONVOLUTIONS"]}
    wanted = {
        "redis": {"url": "redis://10.0.0.5:6380/2"},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "backend": {"kind": "remote", "remote": {"address": "/tmp/engine.sock"}, "tensorrt": tensorrt},
        "pipeline": {"decode_threads": 3},
    }
    for name, value in environment(wanted).items():
        monkeypatch.setenv(name, value)
    settings = Settings.load()
    assert settings.redis.url == "redis://10.0.0.5:6380/2" and settings.metrics.port == 0
    assert settings.backend.kind == "remote" and settings.backend.remote.address == "/tmp/engine.sock"
    assert settings.backend.tensorrt.fp16 is True and settings.backend.tensorrt.tactic_sources == (
        "EDGE_MASK_CONVOLUTIONS",
    )
    assert settings.pipeline.decode_threads == 3
