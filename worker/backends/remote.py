"""An engine in another process: one engine server owns the device, worker processes share it.

One Python process cannot feed a large GPU: decoding, postprocessing and Redis traffic hold the GIL
long before the engine is busy. Several worker processes can, but separate processes on one GPU
are time-sliced (their kernels never overlap), so the engine stays in one process: the server
opens the real backend once (one CUDA context: every execution context and stream can overlap)
and lends its lanes to the workers.

Each worker lane owns a shared-memory block (input pixels, then outputs) and a connection to the
server. A run is one small message each way: the server takes a free lane of the bucket and runs
the block's batch, its outputs written back into the block. The server pins each block when it is
attached (a GPU backend copies to and from it directly); a backend that cannot pin it copies through
the lane's own buffers. Failures come back typed; a lost server is a lost device (the worker stops,
to be restarted with it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from worker.backends.base import Backend, Compressed, HostBlock, Lane, Outputs, Pixels
from worker.compute.graph import output_capacity
from worker.core.buckets import BucketSpec, ModelSpec
from worker.core.errors import (
    BackendError,
    EngineLoadError,
    InternalError,
    ShapeOutOfProfileError,
    WorkerError,
)

logger = logging.getLogger(__name__)

_ERRORS: dict[str, type[Exception]] = {
    "ShapeOutOfProfileError": ShapeOutOfProfileError,
    "BackendError": BackendError,
    "InternalError": InternalError,
}


def _layout(spec: ModelSpec, bucket: BucketSpec) -> tuple[int, dict[str, tuple[np.dtype[Any], int, int]]]:
    """Bytes of the input region, and per output (dtype, offset, capacity) in a lane's block."""
    n, h, w = bucket.max
    offset = n * h * w * spec.channels
    outputs = {}
    for name, (dtype, shape) in output_capacity(spec, bucket).items():
        size = int(np.prod(shape)) * dtype.itemsize
        outputs[name] = (dtype, offset, size)
        offset += size
    return offset, outputs


def _signature(spec: ModelSpec) -> list[Any]:
    """What client and server must agree on: the engine graph's inputs, outputs and profiles."""
    return [spec.name, spec.engine_output, [[b.id, b.min, b.max] for b in spec.buckets]]


# ---- server --------------------------------------------------------------------------------


class EngineServer:
    """Serves an open backend's lanes on a Unix socket; one thread per attached worker lane."""

    def __init__(self, backend: Backend, spec: ModelSpec, address: Path) -> None:
        self.backend = backend
        self.spec = spec
        self.address = address
        self._free: dict[str, queue.Queue[Lane]] = {}
        for bucket in spec.buckets:
            pool: queue.Queue[Lane] = queue.Queue()
            for lane in backend.lanes(bucket.id):
                pool.put(lane)
            self._free[bucket.id] = pool
        self._listener: Listener | None = None
        self.attached = 0

    def serve_forever(self) -> None:
        """Accept workers until ``close`` (or until the backend becomes unusable)."""
        self.address.unlink(missing_ok=True)
        self._listener = Listener(str(self.address), family="AF_UNIX")
        logger.info("engine server on %s: %s", self.address, self.backend.describe())
        while True:
            try:
                conn = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="engine-client", daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self.address.unlink(missing_ok=True)

    def _serve(self, conn: Connection) -> None:
        shm: SharedMemory | None = None
        block: HostBlock | None = None
        try:
            kind, *args = conn.recv()
            if kind == "describe":
                conn.send(("spec", _signature(self.spec), self.backend.describe()))
                return
            bucket_id, shm_name = args
            bucket = self.spec.bucket(bucket_id)
            shm = SharedMemory(name=shm_name)
            # the worker created the block and unlinks it; this process only borrows it
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            self.attached += 1
            assert shm.buf is not None  # open until close()
            block = HostBlock(shm.buf, self.spec.channels, _layout(self.spec, bucket)[1])
            self.backend.pin(block)
            conn.send(("attached", block.pinned))
            while True:
                _, n, h, w, jpegs = conn.recv()
                conn.send(self._run(bucket, block, (n, h, w), jpegs))
        except (EOFError, OSError):
            pass  # the worker went away
        except WorkerError as exc:  # the device failed while pinning: the worker sees its server go
            logger.error("engine server: cannot serve a worker lane: %s", exc)
        finally:
            if block is not None:
                self._unpin(block)
            if shm is not None:
                self.attached -= 1
                shm.close()
            conn.close()

    def _unpin(self, block: HostBlock) -> None:
        try:
            self.backend.unpin(block)
        except WorkerError as exc:  # a broken device: the memory is unmapped all the same
            logger.warning("engine server: cannot unpin a worker's shared memory: %s", exc)

    def _run(
        self, bucket: BucketSpec, block: HostBlock, shape: tuple[int, int, int], jpegs: list[tuple[int, int, int, int]]
    ) -> tuple[Any, ...]:
        """``jpegs``: (slot, length, height, width) of the JPEGs the worker left in their slots."""
        n, h, w = shape
        slot_bytes = h * w * self.spec.channels
        compressed = [
            (slot, block.buffer[slot * slot_bytes : slot * slot_bytes + length], height, width)
            for slot, length, height, width in jpegs
        ]
        asked = time.perf_counter()
        lane = self._free[bucket.id].get()
        lane_wait = time.perf_counter() - asked
        try:
            shapes = lane.run_block(block, n, h, w, compressed)
            return ("ok", shapes, sorted(lane.undecodable), {"lane_wait": lane_wait, **lane.timings})
        except WorkerError as exc:
            return ("error", type(exc).__name__, str(exc), not self.backend.healthy)
        except Exception as exc:
            logger.exception("engine server: a run failed")
            return ("error", "InternalError", f"{type(exc).__name__}: {exc}", not self.backend.healthy)
        finally:
            self._free[bucket.id].put(lane)


# ---- client --------------------------------------------------------------------------------


def _connect(address: str, timeout_s: float) -> Connection:
    """Connect, waiting for the server to come up (it may be building its plan)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address, family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise EngineLoadError(f"no engine server answers on {address} after {timeout_s:.0f} s: {exc}") from None
            time.sleep(0.2)


class RemoteLane(Lane):
    def __init__(self, bucket: BucketSpec, backend: RemoteBackend) -> None:
        super().__init__(bucket, backend.spec)
        self._backend = backend
        size, self._outputs = _layout(backend.spec, bucket)
        self._shm = SharedMemory(create=True, size=size)
        self._conn = _connect(backend.settings.remote.address, backend.settings.remote.connect_timeout_s)
        self._conn.send(("attach", bucket.id, self._shm.name))
        reply = self._conn.recv()
        if reply[0] != "attached":
            raise EngineLoadError(f"the engine server refused a lane of bucket {bucket.id}")
        #: the server's device copies straight from and into this block (no staging copies)
        self.pinned: bool = reply[1]
        self.decodes_jpeg = backend.decodes_jpeg

    def _input(self, n: int, height: int, width: int) -> Pixels:
        return np.ndarray((n, height, width, self.spec.channels), np.uint8, buffer=self._shm.buf)

    def _run(self, n: int, height: int, width: int, compressed: Sequence[Compressed]) -> Outputs:
        """JPEGs travel in their slots of the block, compressed, for the server's device to decode."""
        slot_bytes = height * width * self.spec.channels
        block = self._shm.buf
        assert block is not None  # open until close()
        for slot, data, _, _ in compressed:
            block[slot * slot_bytes : slot * slot_bytes + len(data)] = data
        jpegs = [(slot, len(data), h, w) for slot, data, h, w in compressed]
        try:
            self._conn.send(("run", n, height, width, jpegs))
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._backend.healthy = False
            raise BackendError(f"the engine server is gone: {exc or type(exc).__name__}") from exc
        if reply[0] == "error":
            _, kind, message, lost = reply
            if lost:
                self._backend.healthy = False
            raise _ERRORS.get(kind, BackendError)(f"engine server: {message}")
        self.undecodable = set(reply[2])
        self.timings = reply[3]
        return {
            name: np.ndarray(shape, self._outputs[name][0], buffer=self._shm.buf, offset=self._outputs[name][1])
            for name, shape in reply[1].items()
        }

    def close(self) -> None:
        self._conn.close()
        self._shm.close()
        self._shm.unlink()


class RemoteBackend(Backend):
    """Lanes of an engine server (``imgworker serve-engine``); see the module's docstring."""

    kind = "remote"

    def _open(self) -> None:
        remote = self.settings.remote
        if not remote.address:
            raise EngineLoadError("backend.remote.address is not set: the engine server's socket path")
        conn = _connect(remote.address, remote.connect_timeout_s)
        try:
            conn.send(("describe",))
            _, signature, self.server = conn.recv()
        finally:
            conn.close()
        if signature != _signature(self.spec):
            raise EngineLoadError(
                f"the engine server serves {signature}, this worker's spec is {_signature(self.spec)}"
            )

    def _make_lanes(self, bucket: BucketSpec, profile: int) -> list[Lane]:
        return [RemoteLane(bucket, self) for _ in range(self.settings.remote.lanes)]

    @property
    def jpeg_decode(self) -> str:
        return str(getattr(self, "server", {}).get("jpeg_decode", "cpu"))

    def describe(self) -> dict[str, str]:
        return {**getattr(self, "server", {}), "kind": f"remote {getattr(self, 'server', {}).get('kind', '?')}"}
