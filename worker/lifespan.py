"""One worker process's lifespan: ``async with Worker.open(settings) as worker: await worker.run()``.

Opening serves /metrics and the health probes and routes SIGTERM/SIGINT to ``stop``. ``run`` opens
the backend (on a thread of its own: an engine build cannot be interrupted, and a stop need not
wait for it), then serves. Leaving stops, drains, settles, releases the lease (``Service.run``
does those in that order before it returns) and closes the backend, unless a batch still runs
on it or it is still opening: ``unfinished`` then tells the caller to end the process without
waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

from worker import __version__
from worker.backends import open_backend
from worker.backends.base import Backend
from worker.core.buckets import ModelSpec, load_model_spec
from worker.core.errors import ConfigError
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.http import serve_http
from worker.pipeline.service import Service
from worker.transport.broker import Broker
from worker.transport.connection import redact

logger = logging.getLogger("worker")
T = TypeVar("T")


def _in_daemon_thread(fn: Callable[[], T]) -> Future[T]:
    """A long blocking call (an engine build) that a stop need not wait for."""
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


class Worker:
    def __init__(self, settings: Settings, spec: ModelSpec, metrics: Metrics) -> None:
        self.settings = settings
        self.spec = spec
        self.metrics = metrics
        self.service: Service | None = None
        #: the process must end without waiting: a batch still runs on the backend, or it is still opening
        self.unfinished = False
        self._stopped = asyncio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Worker]:
        logger.info(
            "imgworker %s, consumer %s, redis %s", __version__, settings.redis.consumer, redact(settings.redis.url)
        )
        worker = cls(settings, load_model_spec(settings.model_spec), Metrics())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        server = worker._serve_http()
        try:
            yield worker
        finally:
            if server is not None:
                server.shutdown()

    def ready(self) -> bool:
        return bool(self.service and self.service.ready())

    def stop(self) -> None:
        self._stopped.set()
        if self.service is not None:
            self.service.stop()

    def _serve_http(self) -> ThreadingHTTPServer | None:
        metrics = self.settings.metrics
        if not metrics.enabled:
            return None
        try:
            server = serve_http(metrics.host, metrics.port, self.metrics.registry, self.ready)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics.host}:{metrics.port}: {exc.strerror or exc}") from None
        logger.info("metrics and health on http://%s:%d/metrics", *server.server_address[:2])
        return server

    async def run(self, burst: bool = False) -> int:
        """Serve until stopped (or, with ``burst``, until the queue is empty); the exit status."""
        backend = await self._open_backend()
        if backend is None:
            return 0
        broker = Broker(self.settings.redis)
        self.service = Service(self.settings, self.spec, backend, broker, self.metrics)
        if self._stopped.is_set():
            self.service.stop()
        try:
            return await self.service.run(burst=burst)
        finally:
            await broker.aclose()
            if self.service.lanes_idle():
                await asyncio.to_thread(backend.close)
            else:  # closing under a running batch could free buffers the GPU still uses
                logger.warning("a batch is still running at exit; leaving it and the backend to the process exit")
                self.unfinished = True

    async def _open_backend(self) -> Backend | None:
        """The open backend, or None when a stop came first (it is left opening: ``unfinished``)."""
        settings, spec = self.settings, self.spec
        opening = asyncio.wrap_future(
            _in_daemon_thread(lambda: open_backend(spec, settings.onnx_path(spec.onnx), settings.backend))
        )
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait([opening, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not opening.done():
            logger.info("stopped while the backend was starting; exiting without waiting for it")
            self.unfinished = True
            return None
        backend = opening.result()
        describe = backend.describe()
        logger.info("backend %s open with buckets %s", describe, [b.id for b in spec.buckets])
        self.metrics.build_info.info({"version": __version__, "model": spec.name, **describe})
        if settings.metrics.gpu and backend.kind == "tensorrt":
            from worker.gpu_metrics import register_gpu_metrics

            register_gpu_metrics(self.metrics.registry, settings.backend.tensorrt.device)
        return backend
