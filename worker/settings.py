"""One settings tree, read from IMGWORKER_* environment variables (``__`` nests) and ``.env``.

Invalid values stop the worker at start with a message naming the field (``Settings.load``).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def _default_consumer() -> str:
    """Unique per process, so a restarted worker never inherits a dead one's lease."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "imgworker"
    group: str = "workers"
    consumer: str = Field(default_factory=_default_consumer)
    lease_s: Annotated[float, Field(gt=0)] = 30.0
    max_deliveries: Annotated[int, Field(ge=1)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 2.0
    result_ttl_s: Annotated[int, Field(ge=1)] = 3600
    read_count: Annotated[int, Field(ge=1)] = 32
    block_ms: Annotated[int, Field(ge=1)] = 500
    dead_letter_maxlen: Annotated[int, Field(ge=1)] = 100_000
    socket_timeout_s: Annotated[float, Field(gt=0)] = 10.0


class TensorRTSettings(_Section):
    plan_dir: Path = Path.home() / ".cache" / "imgworker" / "plans"
    optimization_level: Annotated[int, Field(ge=0, le=5)] = 3
    fp16: bool = False
    #: TF32 tensor-core math for float32 layers (TensorRT's default); off gives plain fp32 results
    tf32: bool = True
    workspace_mib: Annotated[int, Field(ge=16)] = 4096
    #: names of trt.TacticSource members; None keeps TensorRT's default set
    tactic_sources: tuple[str, ...] | None = None
    instances: Annotated[int, Field(ge=1, le=8)] = 1
    device: Annotated[int, Field(ge=0)] = 0


class BackendSettings(_Section):
    #: "onnxruntime", "tensorrt", or "package.module:Class" for a backend of your own
    kind: str = "onnxruntime"
    fallback_to_cpu: bool = False
    cpu_threads: Annotated[int, Field(ge=0)] = 0
    tensorrt: TensorRTSettings = TensorRTSettings()


class PipelineSettings(_Section):
    decode_threads: Annotated[int, Field(ge=1)] = max(os.cpu_count() or 1, 1)
    max_inflight: Annotated[int, Field(ge=1)] = 256
    max_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    max_image_bytes: Annotated[int, Field(ge=1)] = 64 * 1024 * 1024


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    #: 0 picks a free port (tests); the bound port is logged
    port: Annotated[int, Field(ge=0, le=65535)] = 9400
    enabled: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGWORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    redis: RedisSettings = RedisSettings()
    backend: BackendSettings = BackendSettings()
    pipeline: PipelineSettings = PipelineSettings()
    metrics: MetricsSettings = MetricsSettings()
    model_spec: Path = REPO_CONFIG_DIR / "ppocr_det.yaml"
    assets_dir: Path = Path.home() / ".cache" / "imgworker" / "assets"
    #: the ONNX file; None takes the spec's file from assets_dir
    model_path: Path | None = None
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 25.0
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"

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
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid settings: {problems}") from exc

    def onnx_path(self, spec_file: str) -> Path:
        return self.model_path or self.assets_dir / "models" / spec_file
