"""One settings tree, read from IMGWORKER_* environment variables (``__`` nests) and ``.env``.

Invalid values stop the worker at start with a message naming the field (``Settings.load``).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.core.errors import ConfigError

#: model specs shipped inside the package, so an installed wheel runs with no checkout around it
PACKAGED_SPECS = Path(__file__).resolve().parent.parent / "specs"
DEFAULT_SPEC = PACKAGED_SPECS / "ppocr_det.yaml"
REDIS_SCHEMES = ("redis", "rediss", "unix")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU
    quota (a container's CPU limit), which ``os.cpu_count()`` ignores and over-threads."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _default_consumer() -> str:
    """Unique per process, so a restarted worker never inherits a dead one's lease."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    #: overrides a password in the URL; kept out of every log line and error message
    password: SecretStr | None = None
    #: TLS (a rediss:// URL): CA bundle to verify the server, client certificate and key for mutual TLS
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "imgworker"
    #: a Redis Cluster: one URL of any node; keys are hash-tagged by shard (see docs/protocol.md)
    cluster: bool = False
    #: job shards: streams and keys spread over hash slots (cluster masters); producers and workers
    #: must agree on it. 1 on a single instance keeps the plain key layout
    shards: Annotated[int, Field(ge=1, le=1024)] = 1
    #: producers: submitting returns only once this many replicas have the jobs (Redis WAIT), so
    #: a failover to a replica loses none of them
    replicas: Annotated[int, Field(ge=0)] = 0
    group: str = "workers"
    consumer: str = Field(default_factory=_default_consumer)
    lease_s: Annotated[float, Field(gt=0)] = 30.0
    #: attempts a job may use up (failures, or deaths of the worker running it) before it is dead-lettered
    max_deliveries: Annotated[int, Field(ge=1)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 2.0
    result_ttl_s: Annotated[int, Field(ge=1)] = 3600
    #: reads a worker keeps on the wire at once, sharing its in-flight window: a server sends a
    #: large reply 64 KB per turn of its event loop, so on a busy server one read at a time caps
    #: a worker's intake (two H200s on a cluster: 70 ms a read; 4 gave 17-27% more,
    #: docs/measurements/notes.md)
    concurrent_reads: Annotated[int, Field(ge=1, le=16)] = 4
    block_ms: Annotated[int, Field(ge=1)] = 500
    dead_letter_maxlen: Annotated[int, Field(ge=1)] = 100_000
    socket_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(f"the URL scheme must be one of {', '.join(REDIS_SCHEMES)}, got {parts.scheme!r}")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError as exc:
            raise ValueError(f"malformed URL: {exc}") from None
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("the URL names no host")
        return url


class TensorRTSettings(_Section):
    plan_dir: Path = Path.home() / ".cache" / "imgworker" / "plans"
    optimization_level: Annotated[int, Field(ge=0, le=5)] = 3
    fp16: bool = False
    #: TF32 tensor-core math for float32 layers (TensorRT's default); off gives plain fp32 results
    tf32: bool = True
    workspace_mib: Annotated[int, Field(ge=16)] = 4096
    #: names of trt.TacticSource members; None keeps TensorRT's default set
    tactic_sources: tuple[str, ...] | None = None
    #: execution contexts per bucket, each with two lanes: one batch copies in and decodes while
    #: another executes
    instances: Annotated[int, Field(ge=1, le=8)] = 2
    device: Annotated[int, Field(ge=0)] = 0
    #: lane threads spin on their stream instead of sleeping until the GPU signals: a few
    #: microseconds less per batch, a busy core per waiting lane
    spin_wait: bool = False
    #: JPEGs already at their input size decode on the GPU's JPEG engines (nvImageCodec, in the
    #: ``gpu`` extra), not on the host CPU: under half the CPU per image, the same boxes but for
    #: outlines a pixel apart (docs/performance.md); without nvImageCodec the CPU decodes them
    gpu_jpeg: bool = True


class FakeSettings(_Section):
    """The ``fake`` backend: no model, a recorded probability map, a configurable cost."""

    batch_ms: Annotated[float, Field(ge=0)] = 0.0
    image_ms: Annotated[float, Field(ge=0)] = 0.0
    lanes: Annotated[int, Field(ge=1, le=64)] = 2


class RemoteSettings(_Section):
    """The ``remote`` backend: lanes of an engine server in another process (``imgworker serve-engine``)."""

    #: the engine server's Unix socket
    address: str = ""
    #: lanes per bucket this worker keeps in flight on the server
    lanes: Annotated[int, Field(ge=1, le=16)] = 2
    #: how long to wait for the server to answer (it may be building its plan)
    connect_timeout_s: Annotated[float, Field(gt=0)] = 1800.0


class BackendSettings(_Section):
    #: "onnxruntime", "tensorrt", "fake", "remote", or "package.module:Class" for a backend of your own
    kind: str = "onnxruntime"
    fallback_to_cpu: bool = False
    cpu_threads: Annotated[int, Field(ge=0)] = 0
    tensorrt: TensorRTSettings = TensorRTSettings()
    fake: FakeSettings = FakeSettings()
    remote: RemoteSettings = RemoteSettings()


class PipelineSettings(_Section):
    #: threads that decode images and postprocess maps (OpenCV releases the GIL)
    decode_threads: Annotated[int, Field(ge=1)] = Field(default_factory=usable_cores)
    #: entries held at once; None: about two batches per execution context, so a killed worker
    #: orphans few jobs and a stop drains in seconds
    max_inflight: Annotated[int, Field(ge=1)] | None = None
    max_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    max_image_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024
    #: decoded bytes all concurrent decodes may hold together; one image may use it all
    decode_budget_mib: Annotated[int, Field(ge=16)] = 1024
    #: a job held this long means the pipeline is wedged: not ready, exit 1, jobs left to others
    stall_s: Annotated[float, Field(gt=0)] = 300.0


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    #: 0 picks a free port (tests); the bound port is logged
    port: Annotated[int, Field(ge=0, le=65535)] = 9400
    enabled: bool = True
    #: GPU utilisation and memory through NVML when the backend runs on a GPU
    gpu: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGWORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    redis: RedisSettings = RedisSettings()
    backend: BackendSettings = BackendSettings()
    pipeline: PipelineSettings = PipelineSettings()
    metrics: MetricsSettings = MetricsSettings()
    model_spec: Path = DEFAULT_SPEC
    assets_dir: Path = Path.home() / ".cache" / "imgworker" / "assets"
    #: the ONNX file; None takes the spec's file from assets_dir
    model_path: Path | None = None
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 25.0
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Settings:
        if self.redis.block_ms / 1000 >= self.redis.lease_s:
            raise ValueError("redis.block_ms must be shorter than redis.lease_s")
        return self

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Build from env, ``.env`` and overrides; a bad value becomes a ConfigError naming the field."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            # err['msg'] only: the input values may hold secrets
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid settings: {problems}") from None

    def onnx_path(self, spec_file: str) -> Path:
        return self.model_path or self.assets_dir / "models" / spec_file


def environment(values: Mapping[str, Any], prefix: str = "IMGWORKER_") -> dict[str, str]:
    """Settings as the environment variables that set them (``{"redis": {"url": u}}`` gives
    IMGWORKER_REDIS__URL=u), for child processes: lists and tuples as JSON, the way they are read."""
    out: dict[str, str] = {}
    for name, value in values.items():
        key = f"{prefix}{name.upper()}"
        if isinstance(value, Mapping):
            out.update(environment(value, f"{key}__"))
        elif isinstance(value, list | tuple):
            out[key] = json.dumps(list(value))
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
