"""``python -m worker``: run, enqueue, fetch-assets, build-engine."""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from worker import __version__
from worker.errors import ConfigError, WorkerError
from worker.logs import configure_logging
from worker.settings import Settings

logger = logging.getLogger("worker")
EXIT_CONFIG = 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "redis_url", None):
        overrides["redis"] = {"url": args.redis_url}
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    return Settings.load(**overrides)


# ---- run ---------------------------------------------------------------------------------------


async def _serve(settings: Settings, burst: bool) -> int:
    from worker.backends import open_backend
    from worker.broker import Broker
    from worker.buckets import load_model_spec
    from worker.http import serve_http
    from worker.metrics import Metrics
    from worker.service import Service

    spec = load_model_spec(settings.model_spec)
    metrics = Metrics()
    service: Service | None = None
    server = None
    if settings.metrics.enabled:
        server = serve_http(
            settings.metrics.host, settings.metrics.port, metrics.registry, lambda: bool(service and service.ready())
        )
        logger.info("metrics and health on http://%s:%d/metrics", *server.server_address[:2])
    backend = await asyncio.to_thread(open_backend, spec, settings.onnx_path(spec.onnx), settings.backend)
    logger.info("backend %s open with buckets %s", backend.describe(), [b.id for b in spec.buckets])
    broker = Broker(settings.redis)
    service = Service(settings, spec, backend, broker, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    try:
        return await service.run(burst=burst)
    finally:
        await broker.aclose()
        await asyncio.to_thread(backend.close)
        if server is not None:
            server.shutdown()


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    logger.info("imgworker %s, consumer %s, redis %s", __version__, settings.redis.consumer, settings.redis.url)
    return asyncio.run(_serve(settings, args.burst))


# ---- enqueue -----------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files as given, directories walked for images, globs expanded; order kept, duplicates dropped."""
    from worker.assets import IMAGE_SUFFIXES

    paths: list[Path] = []
    for pattern in patterns:
        # a glob that matches nothing stays as given, so it gets its own "unreadable" line
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        matches = matches or [pattern]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                paths.append(path)
    return list(dict.fromkeys(paths))


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.enabled = label, total, sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.enabled and self.total:
            width = 30
            filled = width * done // self.total
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def _enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from worker.client import AsyncClient
    from worker.protocol import JobResult

    paths = expand_inputs(args.paths)
    lines: dict[Path, dict[str, Any]] = {}
    images: list[tuple[Path, bytes]] = []
    for path in paths:
        try:
            images.append((path, path.read_bytes()))
        except OSError as exc:
            lines[path] = {
                "path": str(path),
                "job_id": None,
                "status": "error",
                "code": "unreadable",
                "message": str(exc),
                "result": None,
            }
    started = time.monotonic()
    async with AsyncClient(settings.redis.url, settings.redis.prefix, settings.redis.result_ttl_s) as client:
        progress = Progress("enqueue", len(images))
        ids: dict[Path, str] = {}
        for chunk_start in range(0, len(images), 64):
            chunk = images[chunk_start : chunk_start + 64]
            new_ids = await client.submit_many(
                [data for _, data in chunk],
                priority=args.priority,
                tensors=args.tensors,
                sources=[str(p) for p, _ in chunk],
            )
            ids.update(zip([p for p, _ in chunk], new_ids, strict=True))
            progress.update(len(ids))
        results: dict[str, JobResult] = {}
        if args.wait:
            progress = Progress("results", len(ids))
            results = await client.gather(
                list(ids.values()), args.timeout, on_result=lambda *_: progress.update(len(results) + 1)
            )
    elapsed = time.monotonic() - started
    for path, job_id in ids.items():
        found = results.get(job_id)
        if found is not None:
            lines[path] = {
                "path": str(path),
                "job_id": job_id,
                "status": found.status,
                "code": found.code or None,
                "message": found.message or None,
                "result": found.result or None,
            }
        elif args.wait:
            lines[path] = {
                "path": str(path),
                "job_id": job_id,
                "status": "error",
                "code": "timeout",
                "message": f"no result within {args.timeout} s",
                "result": None,
            }
        else:
            lines[path] = {
                "path": str(path),
                "job_id": job_id,
                "status": "queued",
                "code": None,
                "message": None,
                "result": None,
            }
    for path in paths:
        line = lines[path]
        if args.json:
            print(json.dumps(line), flush=True)
        else:
            detail = f"{len(line['result']['boxes'])} boxes" if line["status"] == "ok" else (line["code"] or "")
            print(f"{line['status']:6} {line['job_id'] or '-':32} {path} {detail}")
    if args.wait:
        _summary(list(lines.values()), elapsed)
    return 1 if any(line["code"] in ("unreadable", "timeout") for line in lines.values()) else 0


def _summary(lines: list[dict[str, Any]], elapsed_s: float) -> None:
    ok = [line for line in lines if line["status"] == "ok"]
    errors: dict[str, int] = {}
    for line in lines:
        if line["status"] != "ok":
            errors[line["code"]] = errors.get(line["code"], 0) + 1
    total_ms = [line["result"]["timings_ms"].get("total", 0.0) for line in ok]
    parts = [f"{len(lines)} jobs: {len(ok)} ok, {len(lines) - len(ok)} error {errors or ''}".rstrip()]
    parts.append(f"{len(lines) / elapsed_s:.1f} images/s over {elapsed_s:.2f} s")
    if total_ms:
        parts.append(f"latency p50 {_percentile(total_ms, 50):.0f} ms, p99 {_percentile(total_ms, 99):.0f} ms")
    print("summary: " + "; ".join(parts), file=sys.stderr)


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging("WARNING", settings.log_format)
    return asyncio.run(_enqueue(args, settings))


# ---- assets and engines ------------------------------------------------------------------------


def cmd_fetch_assets(args: argparse.Namespace) -> int:
    from worker.assets import fetch_assets

    settings = Settings.load(**({"assets_dir": args.assets_dir} if args.assets_dir else {}))
    configure_logging(settings.log_level, settings.log_format)
    counts = fetch_assets(settings.assets_dir, edge_cases=not args.no_edge_cases)
    print(f"assets in {settings.assets_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from worker.buckets import load_model_spec

    settings = Settings.load(**({"model_spec": args.spec} if args.spec else {}))
    configure_logging(settings.log_level, settings.log_format)
    from worker.backends import backend_class

    backend_class("tensorrt")  # a clear ConfigError when the gpu extra is missing
    from worker.backends.tensorrt.build import plan_for

    spec = load_model_spec(settings.model_spec)
    path = plan_for(spec, settings.onnx_path(spec.onnx), settings.backend.tensorrt, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve jobs from Redis")
    run.add_argument("--redis-url")
    run.add_argument("--burst", action="store_true", help="exit once the queue is empty and everything is settled")
    run.add_argument("--metrics-port", type=int)
    run.set_defaults(handler=cmd_run)

    enqueue = sub.add_parser("enqueue", help="submit images (files, directories, globs)")
    enqueue.add_argument("--redis-url")
    enqueue.add_argument("--wait", action="store_true", help="wait for every result")
    enqueue.add_argument("--json", action="store_true", help="one JSON line per input on stdout")
    enqueue.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all results")
    enqueue.add_argument("--priority", type=int, default=1, choices=(0, 1, 2), help="0 high, 1 normal, 2 low")
    enqueue.add_argument("--tensors", action="store_true", help="also return the raw output tensors")
    enqueue.add_argument("paths", nargs="+", metavar="PATH")
    enqueue.set_defaults(handler=cmd_enqueue)

    fetch = sub.add_parser("fetch-assets", help="download the model and sample photos (pinned, sha256-checked)")
    fetch.add_argument("--assets-dir", type=Path)
    fetch.add_argument("--no-edge-cases", action="store_true", help="skip pillow's decoder edge-case images")
    fetch.set_defaults(handler=cmd_fetch_assets)

    build = sub.add_parser("build-engine", help="build (or reuse) the TensorRT plan, one profile per bucket")
    build.add_argument("--spec", type=Path, help="model spec YAML (default: settings.model_spec)")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached plan matches")
    build.set_defaults(handler=cmd_build_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
