"""imgworker: a Redis-fed image inference worker (``python -m worker`` or ``imgworker``).

Every setting is also an environment variable IMGWORKER_<SECTION>__<FIELD> (or a line in .env),
for example IMGWORKER_REDIS__URL, IMGWORKER_BACKEND__KIND=tensorrt, IMGWORKER_METRICS__PORT;
command-line flags win over both. An invalid setting exits with status 2 and names the field.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from worker import __version__
from worker.core.errors import ConfigError, InvalidJobError, WorkerError
from worker.core.logs import configure_logging
from worker.core.settings import Settings

logger = logging.getLogger("worker")
EXIT_CONFIG = 2
#: enqueue: Redis could not be reached, or refused some jobs
EXIT_REDIS = 3
T = TypeVar("T")
#: what `enqueue DIR` picks up: every format the worker decodes
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tga"}
)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "redis_url", None):
        overrides["redis"] = {"url": args.redis_url}
    metrics: dict[str, Any] = {}
    if getattr(args, "metrics_port", None) is not None:
        metrics["port"] = args.metrics_port
    if getattr(args, "metrics_host", None):
        metrics["host"] = args.metrics_host
    if metrics:
        overrides["metrics"] = metrics
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    return Settings.load(**overrides)


# ---- run ---------------------------------------------------------------------------------------


async def _serve(settings: Settings, burst: bool) -> tuple[int, bool]:
    """The exit status, and whether work is left running that the process must not wait for."""
    from worker.lifespan import Worker

    async with Worker.open(settings) as worker:
        code = await worker.run(burst)
    return code, worker.unfinished


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if args.processes > 1 or args.gpus:
        from worker.supervisor import supervise

        return supervise(settings, args.processes, args.gpus, args.burst)
    code, unfinished = asyncio.run(_serve(settings, args.burst))
    if unfinished:
        # A stop came while an engine was building or a batch was running: neither can be
        # interrupted, waiting for them would outlast the grace period, and interpreter shutdown
        # under them could crash. Everything else is cleaned up already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_serve_engine(args: argparse.Namespace) -> int:
    """The engine server of one GPU: its lanes, lent to worker processes over a Unix socket."""
    from worker.backends import open_backend
    from worker.backends.remote import EngineServer
    from worker.core.buckets import load_model_spec

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if settings.backend.kind == "remote":
        raise ConfigError("serve-engine opens the engine itself: backend.kind cannot be remote")
    spec = load_model_spec(settings.model_spec)
    backend = open_backend(spec, settings.onnx_path(spec.onnx), settings.backend)
    server = EngineServer(backend, spec, args.socket)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.close())
    try:
        server.serve_forever()
    finally:
        server.close()
        if server.attached == 0:  # else a worker's batch may still be running on a lane
            backend.close()
    return 0


# ---- enqueue -----------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files as given, directories walked for images, globs expanded; in order, each file once.

    A file reached twice (named again, inside a named directory, or spelled another way) is one
    input: one job and one output line.
    """
    paths: list[Path] = []
    for pattern in patterns:
        # a glob that matches nothing stays as given, so it gets its own "unreadable" line
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        for match in matches or [pattern]:
            path = Path(match)
            if path.is_dir():
                paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                paths.append(path)
    seen: set[str] = set()
    unique = []
    for path in paths:
        if (real := os.path.realpath(path)) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


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


def _line(path: Path, job_id: str | None, status: str, code: str | None, message: str | None) -> dict[str, Any]:
    return {"path": str(path), "job_id": job_id, "status": status, "code": code, "message": message, "result": None}


def _text_line(line: dict[str, Any]) -> str:
    if line["status"] == "ok":
        detail = f"{len(line['result']['boxes'])} boxes" if "boxes" in (line["result"] or {}) else ""
    else:
        detail = ": ".join(part for part in (line["code"], line["message"]) if part)
    return f"{line['status']:6} {line['job_id'] or '-':32} {line['path']} {detail}".rstrip()


def _read_inputs(paths: list[Path], lines: list[dict[str, Any]], max_bytes: int) -> list[tuple[int, bytes]]:
    """The inputs that can be read, by index; the others' lines say why not."""
    from worker.client import read_image_file

    readable: list[tuple[int, bytes]] = []
    for index, path in enumerate(paths):
        try:
            readable.append((index, read_image_file(path, max_bytes)))
        except (OSError, InvalidJobError) as exc:
            lines[index]["message"] = str(exc) if isinstance(exc, InvalidJobError) else f"{path}: {exc.strerror}"
    return readable


async def _submit(
    client: Any,
    args: argparse.Namespace,
    paths: list[Path],
    readable: list[tuple[int, bytes]],
    lines: list[dict[str, Any]],
) -> None:
    """Submit in chunks, each job's id derived from its input (so a re-run enqueues nothing twice);
    every line says whether Redis holds its job. A refused chunk stops the submission."""
    from worker.client import SubmitError, content_job_id

    progress = Progress("enqueue", len(readable))
    for start in range(0, len(readable), 64):
        chunk = readable[start : start + 64]
        ids = [content_job_id(data, args.priority, args.tensors) for _, data in chunk]
        try:
            await client.submit_many(
                [data for _, data in chunk],
                job_ids=ids,
                priority=args.priority,
                tensors=args.tensors,
                sources=[str(paths[i]) for i, _ in chunk],
            )
            failed: dict[str, str] = {}
        except SubmitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = exc.failed
        for (index, _), job_id in zip(chunk, ids, strict=True):
            if job_id in failed:
                lines[index] = _line(paths[index], job_id, "error", "not_stored", failed[job_id])
            else:
                lines[index] = _line(paths[index], job_id, "queued", None, None)
        progress.update(start + len(chunk))
        if failed:
            return


async def _enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from worker.client import AsyncClient
    from worker.core.protocol import JobResult

    paths = expand_inputs(args.paths)
    lines: list[dict[str, Any]] = [_line(p, None, "error", "unreadable", None) for p in paths]
    readable = _read_inputs(paths, lines, settings.pipeline.max_image_bytes)
    for index, _ in readable:
        lines[index] = _line(paths[index], None, "error", "not_stored", "not sent")
    started = time.monotonic()
    results: dict[str, JobResult] = {}
    try:
        async with AsyncClient(
            result_ttl_s=settings.redis.result_ttl_s,
            redis_settings=settings.redis,
            connect_timeout_s=args.connect_timeout,
        ) as client:
            if args.wait and not await client.live_workers():
                print(
                    f"warning: no worker holds a lease under prefix {settings.redis.prefix!r}: "
                    "nothing will consume these jobs until one starts",
                    file=sys.stderr,
                )
            await _submit(client, args, paths, readable, lines)
            if args.wait:
                progress = Progress("results", len(readable))
                ids = [line["job_id"] for line in lines if line["status"] == "queued"]
                results = await client.gather(ids, args.timeout, on_result=lambda *_: progress.update(len(results) + 1))
    except WorkerError as exc:  # Redis unreachable: every line still says what became of its input
        print(f"error: {exc}", file=sys.stderr)
        for line in lines:
            if line["code"] == "not_stored" and line["job_id"] is None:
                line["message"] = f"not sent: {exc}"
    for line in lines:
        if line["status"] != "queued" or not args.wait:
            continue
        if (found := results.get(line["job_id"])) is not None:
            line.update(
                status=found.status, code=found.code or None, message=found.message or None, result=found.result or None
            )
        else:
            line.update(status="error", code="timeout", message=f"no result within {args.timeout} s")
    for line in lines:
        print(json.dumps(line) if args.json else _text_line(line), flush=True)
    if args.wait:
        _summary(lines, time.monotonic() - started)
    return _enqueue_status(lines)


def _enqueue_status(lines: list[dict[str, Any]]) -> int:
    """The exit status documented in ``enqueue --help``."""
    if any(line["code"] == "not_stored" for line in lines):
        return EXIT_REDIS
    return 1 if any(line["status"] not in ("ok", "queued") for line in lines) else 0


def _summary(lines: list[dict[str, Any]], elapsed_s: float) -> None:
    ok = [line for line in lines if line["status"] == "ok"]
    errors: dict[str, int] = {}
    for line in lines:
        if line["status"] != "ok":
            errors[line["code"]] = errors.get(line["code"], 0) + 1
    parts = [f"{len(lines)} jobs: {len(ok)} ok, {len(lines) - len(ok)} error {errors or ''}".rstrip()]
    if ok:
        boxes = [len(line["result"].get("boxes", [])) for line in ok]
        parts.append(f"{sum(boxes)} text boxes, in {sum(1 for n in boxes if n)} of {len(ok)} images")
        parts.append(f"{len(ok) / max(elapsed_s, 1e-9):.1f} images/s over {elapsed_s:.2f} s")
        total_ms = [line["result"]["timings_ms"].get("total", 0.0) for line in ok]
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
    counts = fetch_assets(settings.assets_dir, test_material=args.test_material)
    print(f"assets in {settings.assets_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from worker.core.buckets import load_model_spec

    settings = Settings.load(**({"model_spec": args.spec} if args.spec else {}))
    configure_logging(settings.log_level, settings.log_format)
    from worker.backends import backend_class

    backend_class("tensorrt")  # a clear ConfigError when the gpu extra is missing
    from worker.backends.tensorrt.build import plan_for

    spec = load_model_spec(settings.model_spec)
    path = plan_for(spec, settings.onnx_path(spec.onnx), settings.backend.tensorrt, force=args.force)
    print(path)
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, descriptions kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgworker", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary}\n\n{__doc__}", formatter_class=_Formatter)

    def redis_url(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", metavar="URL", help="redis://, rediss:// or unix:// URL (IMGWORKER_REDIS__URL)")

    run = command("run", "serve jobs from Redis until SIGTERM/SIGINT")
    redis_url(run)
    run.add_argument("--burst", action="store_true", help="exit once the queue is empty and everything is settled")
    run.add_argument("--metrics-port", type=int, metavar="PORT", help="port of /metrics, /healthz, /readyz (0: any)")
    run.add_argument(
        "--metrics-host", metavar="ADDRESS", help="address the metrics port binds (IMGWORKER_METRICS__HOST)"
    )
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    run.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="worker processes (per GPU); on a GPU they share one engine server, see docs/operations.md",
    )
    run.add_argument("--gpus", metavar="all|0,1", help="one engine server and N workers on each of these GPUs")
    run.set_defaults(handler=cmd_run)

    engine = command("serve-engine", "serve the engine's lanes to worker processes (started by run --processes)")
    engine.add_argument("--socket", type=Path, required=True, help="Unix socket path to listen on")
    engine.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    engine.set_defaults(handler=cmd_serve_engine)

    enqueue = command("enqueue", "submit images (files, directories, globs); one line per input")
    enqueue.epilog = (
        "Each job's id is derived from its image and options: running the same command again after a "
        "failure enqueues nothing twice, and --wait collects results already stored.\n\n"
        "exit status:\n"
        "  0  every input was queued (with --wait: every job ended ok)\n"
        "  1  some input could not be read, or some job ended with an error or had no result in time\n"
        "  2  invalid settings or arguments\n"
        "  3  Redis could not be reached, or refused some jobs (out of memory): their lines say why"
    )
    redis_url(enqueue)
    enqueue.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to keep trying a Redis that does not answer at first (a server that is starting)",
    )
    enqueue.add_argument("--wait", action="store_true", help="wait for every result")
    enqueue.add_argument("--json", action="store_true", help="one JSON line per input on stdout")
    enqueue.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all results")
    enqueue.add_argument("--priority", type=int, default=1, choices=(0, 1, 2), help="0 high, 1 normal, 2 low")
    enqueue.add_argument("--tensors", action="store_true", help="also return the raw output tensors")
    enqueue.add_argument("paths", nargs="+", metavar="PATH")
    enqueue.set_defaults(handler=cmd_enqueue)

    fetch = command("fetch-assets", "download the model and sample photos (pinned, sha256-checked, cached)")
    fetch.add_argument("--assets-dir", type=Path, help="where to put them (IMGWORKER_ASSETS_DIR)")
    fetch.add_argument(
        "--test-material",
        action="store_true",
        help="also what the tests need: Debian 12's opencv-doc photos (apt, 92 MiB) and Pillow's edge cases (45 MiB)",
    )
    fetch.set_defaults(handler=cmd_fetch_assets)

    build = command("build-engine", "build (or reuse) the TensorRT plan, one profile per bucket")
    build.add_argument("--spec", type=Path, help="model spec YAML (IMGWORKER_MODEL_SPEC)")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached plan matches")
    build.set_defaults(handler=cmd_build_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.handler(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    return code
