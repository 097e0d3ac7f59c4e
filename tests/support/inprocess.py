"""A worker running inside the test's event loop: the pipeline tested without subprocesses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from worker.backends import open_backend
from worker.backends.base import Backend
from worker.core.buckets import ModelSpec, load_model_spec
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.pipeline.service import Service
from worker.transport.broker import Broker


@dataclass
class Running:
    service: Service
    task: asyncio.Task[int]
    metrics: Metrics

    async def stop(self, timeout_s: float = 30) -> int:
        self.service.stop()
        return await asyncio.wait_for(self.task, timeout_s)


@asynccontextmanager
async def serving(
    settings: Settings, spec: ModelSpec | None = None, backend: Backend | None = None, wait_ready: bool = True
) -> AsyncIterator[Running]:
    """Open the backend, run a Service until the block ends (then stop it), close the backend."""
    spec = spec or load_model_spec(settings.model_spec)
    if backend is None:
        backend = await asyncio.to_thread(open_backend, spec, settings.onnx_path(spec.onnx), settings.backend)
    opened: Backend = backend
    metrics = Metrics()
    broker = Broker(settings.redis)
    service = Service(settings, spec, opened, broker, metrics)
    running = Running(service, asyncio.create_task(service.run()), metrics)
    try:
        if wait_ready:
            async with asyncio.timeout(60):
                while not service.ready():
                    if running.task.done():
                        raise AssertionError(f"the service ended before it was ready: {running.task.result()}")
                    await asyncio.sleep(0.01)
        yield running
    finally:
        if not running.task.done():
            await running.stop()
        await broker.aclose()
        if service.lanes_idle():
            opened.close()
