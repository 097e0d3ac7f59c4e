"""JPEGs left compressed for a device that decodes them, through the whole pipeline and through the
engine server's shared memory, with a CPU stand-in for the device (tests/support/decoding.py): the
same boxes as the CPU path, a corrupt JPEG failing alone, every other format decoded here."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import settings_for
from tests.support.decoding import DecodingOrtBackend
from tests.support.inprocess import serving
from worker.backends.onnxruntime import OnnxRuntimeBackend
from worker.backends.remote import EngineServer, RemoteBackend
from worker.client import AsyncClient
from worker.compute.graph import engine_output
from worker.compute.imaging import ByteBudget, Limits, prepare
from worker.core.buckets import ModelSpec
from worker.core.protocol import JobResult
from worker.core.settings import BackendSettings

pytestmark = pytest.mark.slow


def _inputs(assets_dir: Path) -> dict[str, bytes]:
    """The demo's photos (text in each) as 512x384 JPEGs (the device's), one as PNG (the CPU's), and
    a JPEG whose header is fine and whose data is not (found out only by the decode)."""
    demo = sorted(p for p in (assets_dir / "demo").iterdir() if p.suffix in (".jpg", ".png"))
    images = [cv2.resize(cv2.imread(str(p)), (512, 384)) for p in demo][:10]
    inputs = {f"photo-{i}": cv2.imencode(".jpg", image)[1].tobytes() for i, image in enumerate(images)}
    inputs["png"] = cv2.imencode(".png", images[0])[1].tobytes()
    good = inputs["photo-1"]
    table = good.index(b"\xff\xc4") + 5  # the first Huffman table's count of 1-bit codes: more than can exist
    inputs["corrupt"] = good[:table] + b"\x05" + good[table + 1 :]
    return inputs


async def _results(
    redis_url: str, spec: ModelSpec, backend: OnnxRuntimeBackend, inputs: dict[str, bytes]
) -> tuple[dict[str, JobResult], dict[str, float]]:
    """Every input's result, and how many JPEGs each path decoded."""
    settings = settings_for(redis_url, backend={"kind": "onnxruntime"})
    backend.open()
    async with serving(settings, spec, backend) as running, AsyncClient(redis_url) as client:
        ids = await client.submit_many(list(inputs.values()), job_ids=[f"{backend.kind}-{n}" for n in inputs])
        by_id = await client.wait_many(ids, timeout_s=120)
        results = {name: by_id[job_id] for name, job_id in zip(inputs, ids, strict=True)}
        registry = running.metrics.registry
        paths = {
            path: registry.get_sample_value("imgworker_decode_path_total", {"path": path, "format": "jpeg"}) or 0.0
            for path in ("gpu_hw", "cpu")
        }
    return results, paths


async def test_jpegs_the_device_decodes_give_the_cpu_paths_boxes(
    redis_url: str, spec: ModelSpec, onnx_path: Path, assets_dir: Path
) -> None:
    inputs = _inputs(assets_dir)
    cpu, cpu_paths = await _results(redis_url, spec, OnnxRuntimeBackend(spec, onnx_path, BackendSettings()), inputs)
    device, device_paths = await _results(
        redis_url, spec, DecodingOrtBackend(spec, onnx_path, BackendSettings()), inputs
    )
    assert device_paths == {"gpu_hw": 11, "cpu": 0}  # the photos and the corrupt one (the PNG is not a JPEG)
    assert cpu_paths == {"gpu_hw": 0, "cpu": 10}  # the corrupt JPEG fails in the CPU's decode: never counted
    for name in inputs:
        if name == "corrupt":
            assert (cpu[name].code, device[name].code) == ("decode_error", "decode_error"), device[name].message
            continue
        assert device[name].status == "ok" and device[name].result["boxes"] == cpu[name].result["boxes"], name
    assert sum(len(device[n].result["boxes"]) for n in inputs if n != "corrupt") > 10


def test_the_engine_server_decodes_what_a_remote_lane_leaves_compressed(
    tmp_path: Path, spec: ModelSpec, onnx_path: Path, assets_dir: Path
) -> None:
    """The JPEGs travel in their slots of the shared block; a slot that cannot be decoded comes back
    named, and the others match the same batch decoded here."""
    inputs = _inputs(assets_dir)
    budget, limits = ByteBudget(1 << 30), Limits(40_000_000, 1 << 30)
    names = ["photo-0", "corrupt", "photo-2", "photo-3"]
    prepared = [prepare(inputs[n], spec, limits, budget, device_decodes_jpeg=True) for n in names]
    assert all(p.compressed for p in prepared)
    with DecodingOrtBackend(spec, onnx_path, BackendSettings()) as device:
        server = EngineServer(device, spec, tmp_path / "engine.sock")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        settings = BackendSettings(kind="remote", remote={"address": str(tmp_path / "engine.sock")})
        remote = RemoteBackend(spec, onnx_path, settings)
        remote.open()
        try:
            assert remote.decodes_jpeg and remote.describe()["jpeg_decode"] == "gpu_hw"
            bucket = prepared[0].bucket
            (lane,) = remote.lanes(bucket.id)[:1]
            n, h, w = len(names), prepared[0].padded_height, prepared[0].padded_width
            lane.input(n, h, w)
            compressed = [(i, p.compressed, p.height, p.width) for i, p in enumerate(prepared) if p.compressed]
            maps = np.array(lane.run(n, h, w, compressed)[engine_output(spec)])
            assert lane.undecodable == {1}
            local = device.lanes(bucket.id)[0]
            pixels = local.input(n, h, w)
            pixels[:] = spec.preprocess.pad_value()
            for i, name in enumerate(names):
                if name != "corrupt":
                    pixels[i, :384, :512] = cv2.imdecode(np.frombuffer(inputs[name], np.uint8), cv2.IMREAD_COLOR)
            expected = np.array(local.run(n, h, w)[engine_output(spec)])
            for i in (0, 2, 3):
                np.testing.assert_array_equal(maps[i], expected[i])
        finally:
            remote.close()
            server.close()
