"""Images for the container tests, built locally with podman: no registry is needed.

The base is scripts/container_base.sh's stand-in for python:3.12-slim; Redis is Debian's
redis-server on that base, tagged as the official ``redis:7`` so that compose.yaml runs unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO

BASE_IMAGE = "localhost/python-slim:bookworm"
WORKER_IMAGE = "localhost/imgworker:cpu"
REDIS_IMAGE = "docker.io/library/redis:7"

#: What rootful podman needs inside a nested sandbox such as CI's (no systemd, no crun-compatible
#: cgroups, limits it cannot raise); harmless elsewhere.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def podman_env(workdir: Path) -> dict[str, str]:
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _build_flags() -> list[str]:
    """Builds without a nested runtime; pip inside reaches the index through the host's pip
    configuration, where there is one."""
    flags = ["--format", "docker", "--isolation", "chroot", "--network", "host"]
    for path in ("/etc/pip.conf", os.environ.get("PIP_CERT", "")):
        if path and Path(path).is_file():
            flags += ["-v", f"{path}:{path}:ro"]
    return flags


def _run(command: list[str], env: dict[str, str], timeout_s: float) -> None:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])}... failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def build_images(env: dict[str, str]) -> int:
    """The base, the Redis stand-in and the worker's cpu image; returns the worker image's size in bytes."""
    podman = shutil.which("podman") or "podman"
    _run([str(REPO / "scripts" / "container_base.sh"), BASE_IMAGE], env, 900)
    redis_context = REPO / "tests" / "support" / "redis-image"
    base_arg = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    _run([podman, "build", *_build_flags(), *base_arg, "-t", REDIS_IMAGE, str(redis_context)], env, 600)
    _run([podman, "build", *_build_flags(), *base_arg, "--target", "cpu", "-t", WORKER_IMAGE, "."], env, 1200)
    size = subprocess.run(
        [podman, "image", "inspect", WORKER_IMAGE, "--format", "{{.Size}}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(size.stdout.strip())
