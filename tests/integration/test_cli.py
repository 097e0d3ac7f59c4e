from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import REPO
from worker.core.protocol import Keys


def test_enqueue_answers_every_input_once_even_unreadable_ones(
    redis_url: str, redis_client: redis.Redis, photos: list[Path], tmp_path: Path
) -> None:
    twice = tmp_path / "again.jpg"
    twice.symlink_to(photos[0])
    inputs = [
        str(photos[0]),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "nothing-*.png"),
        str(photos[0].parent),
        str(twice),  # the same file under another name
        str(photos[0].parent / ".." / "photos" / photos[0].name),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", "--redis-url", redis_url, "--json", *inputs],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1  # some inputs could not be read
    assert len(lines) == 2 + len(photos)  # photos[0] is named four ways but enqueued once
    unreadable = [line for line in lines if line["code"] == "unreadable"]
    assert [Path(line["path"]).name for line in unreadable] == ["missing.jpg", "nothing-*.png"]
    queued = [line for line in lines if line["status"] == "queued"]
    assert len(queued) == len(photos) and all(line["job_id"] for line in queued)
    assert sum(redis_client.xlen(s) for s in Keys().streams) == len(photos)
