#!/usr/bin/env python3
"""The worker end to end against its own engine, on one plan, in one run (a GPU machine).

measure (on the GPU machine, once per precision):
  raw engine   on the uniform corpus's batch shape: GPU-only time (CUDA events, one context), and
               1, 2 and 4 contexts looping on full batches with copies (pixels into pinned memory,
               host to device, execute, device to host), one thread each;
  worker       `python -m worker run` (``--processes`` of them on the GPU) against a local
               redis-server, every job submitted up front, throughput in the steady window (10% to
               90% of results), p50/p99, mean batch, CPU cores used; for two corpora:
               uniform: real photos resized to one shape (512x384 JPEG), so every batch can be full;
               mixed:   the sample photos as they come; the raw engine then replays the same batch
                        mix (the bucket, shape and size of every batch the worker ran);
  boxes        of a sample of real photos, to compare fp16 with fp32.
variants (on the GPU machine): the worker on the uniform corpus under a few environments, in turns.
decode-load (on the GPU machine): the device's JPEG decoder alone and while 1, 2, 4, 8 contexts keep
  the engine busy: how much of the JPEG engines' speed a loaded GPU leaves (driver settings such as
  CUDA_DEVICE_MAX_CONNECTIONS are compared by running it twice).
report (anywhere): docs/measurements/report.md with every run's table and ratio, and the plot of
  docs/performance.png (the page users read, docs/performance.md, is written by hand from them).

  python3.11 scripts/bench_gpu.py measure --precision fp32 --out bench-fp32.json
  python3.11 scripts/bench_gpu.py measure --precision fp16 --out bench-fp16.json
  python scripts/bench_gpu.py report bench-fp32.json bench-fp16.json [--cpu bench-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.boxes import unmatched  # noqa: E402
from tests.support.corpus import resized_jpegs, sample_photos  # noqa: E402
from tests.support.workers import run_on_fresh_cluster, run_on_fresh_redis  # noqa: E402
from worker.core.buckets import ModelSpec, load_model_spec  # noqa: E402
from worker.core.settings import Settings  # noqa: E402

SPEC = REPO / "tests" / "gpu" / "spec_small.yaml"
UNIFORM_SIZE = (512, 384)  # width, height: the m512 bucket's opt shape, no padding
#: raw engine context counts, and the worker's own count when it differs (the ratio takes the best)
CONTEXTS = (1, 2, 4)
#: fp16 against fp32: boxes scoring at least this must have a counterpart of IoU >= BOX_IOU
CLEAR_SCORE, BOX_IOU = 0.6, 0.9


def mixed_corpus(count: int) -> list[bytes]:
    data = [p.read_bytes() for p in sample_photos()]
    return [data[i % len(data)] for i in range(count)]


# ---- raw engine ----------------------------------------------------------------------------


def open_engine(settings: Settings, spec: ModelSpec, lanes: int) -> Any:
    from worker.backends.tensorrt.backend import TensorRTBackend

    tensorrt = settings.backend.tensorrt.model_copy(update={"instances": lanes})
    backend = TensorRTBackend(
        spec, settings.onnx_path(spec.onnx), settings.backend.model_copy(update={"tensorrt": tensorrt})
    )
    backend.open()
    return backend


def gpu_only_img_s(backend: Any, bucket: str, shape: tuple[int, int, int], runs: int = 200) -> float:
    n, h, w = shape
    lane = backend.lanes(bucket)[0]
    lane.input(n, h, w)[:] = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for _ in range(20):
        lane.time_execute(n, h, w)
    return float(n / (statistics.median(lane.time_execute(n, h, w) for _ in range(runs)) / 1000))


def loop_lanes(backend: Any, batches: list[tuple[str, np.ndarray]], contexts: int, seconds: float) -> float:
    """Images/s of ``contexts`` threads, each with lanes of its own, taking batches round robin."""
    feed = itertools.cycle(batches)
    lock = threading.Lock()
    done = [0] * contexts
    stop = time.monotonic() + seconds

    def loop(worker: int) -> None:
        while time.monotonic() < stop:
            with lock:
                bucket, pixels = next(feed)
            n, h, w, _ = pixels.shape
            lane = backend.lanes(bucket)[worker]
            lane.input(n, h, w)[:] = pixels
            lane.run(n, h, w)
            done[worker] += n

    for worker in range(contexts):  # warm-up, outside the timed loop
        bucket, pixels = batches[0]
        lane = backend.lanes(bucket)[worker]
        lane.input(*pixels.shape[:3])[:] = pixels
        lane.run(*pixels.shape[:3])
    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(contexts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def real_pixels(
    settings: Settings, spec: ModelSpec, shapes: list[tuple[str, int, int, int]]
) -> list[tuple[str, np.ndarray]]:
    """Batches of real photos at the given (bucket, n, h, w) shapes (resized, so no padding)."""
    import cv2

    sources = [image for p in sample_photos()[:32] if (image := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None]
    out = []
    for k, (bucket, n, h, w) in enumerate(shapes):
        batch = np.stack([cv2.resize(sources[(k + i) % len(sources)], (w, h)) for i in range(n)])
        out.append((bucket, batch))
    return out


# ---- the worker ----------------------------------------------------------------------------


def worker_run(
    images: list[bytes], processes: int, extra_env: dict[str, str], gpus: str | None = None, cluster: bool = False
) -> dict[str, Any]:
    args = ("--processes", str(processes), *(("--gpus", gpus) if gpus else ()))
    env = {"IMGWORKER_LOG_LEVEL": "INFO", **extra_env}
    if cluster:
        run = run_on_fresh_cluster(images, env, args=args, timeout_s=1200)
    else:
        run = run_on_fresh_redis(images, env, args=args, timeout_s=1200)
    ok = [r for r in run.results if r.status == "ok"]
    assert len(ok) == len(images), f"{len(images) - len(ok)} jobs failed: {[r.message for r in run.results][:3]}"
    in_worker = run.in_worker_ms
    batches = sum(v for (name, _), v in run.metrics.items() if name == "imgworker_batch_size_count")
    mix: dict[tuple[str, int, int, int], float] = {}
    for r in ok:  # every batch the worker ran, counted from its jobs: size n means n jobs
        body = r.result
        key = (body["bucket"], body["batch_size"], body["input"]["padded_height"], body["input"]["padded_width"])
        mix[key] = mix.get(key, 0) + 1 / body["batch_size"]
    decode_paths: dict[str, float] = {}
    for (name, labels), value in run.metrics.items():
        if name == "imgworker_decode_path_total":
            path = dict(labels)["path"]
            decode_paths[path] = decode_paths.get(path, 0) + value
    return {
        "jobs": len(images),
        "img_s": run.steady_rate,
        # worker processes and engine server together; Redis on its own line
        "vcpu_ms_per_image": 1000 * run.worker_cores / run.steady_rate,
        "redis_vcpu_ms_per_image": 1000 * run.redis_cores / run.steady_rate,
        "decode_paths": decode_paths,
        "p50_ms": statistics.median(in_worker),
        "p99_ms": float(np.percentile(in_worker, 99)),
        "mean_batch": len(images) / max(batches, 1),
        "busy_img_s": run.busy_rate,
        "cores": run.worker_cores,
        "server_cores": run.server_cores,
        "redis_cores": run.redis_cores,
        "jobs_by_gpu": jobs_by_gpu(run.metrics),
        "processes": processes,
        "gpus": gpus or "",
        "batch_mix": [[*key, round(count)] for key, count in mix.items()],
        "stages_ms": stage_medians(ok),
        "means_ms": histogram_means(run.metrics),
        # per worker, against the run's length (jobs / img_s): how long reads waited for room
        "window_full_s": sum(v for (name, _), v in run.metrics.items() if name == "imgworker_window_full_seconds_total")
        / (processes * (len(gpus.split(",")) if gpus else 1)),
    }


def without_batch_mix(run: dict[str, Any]) -> dict[str, Any]:
    """A run as saved beside others: its batch mix is only needed to replay the mixed corpus."""
    return {k: v for k, v in run.items() if k != "batch_mix"}


def histogram_means(metrics: dict[Any, float]) -> dict[str, float]:
    """Mean of each of the workers' duration histograms, in ms (settle and read round trips...),
    the engine's steps each on its own (``engine_step.execute``...)."""
    sums: dict[str, list[float]] = {}
    for (name, labels), value in metrics.items():
        for suffix, index in (("_seconds_sum", 0), ("_seconds_count", 1)):
            if name.startswith("imgworker_") and name.endswith(suffix):
                key = name[len("imgworker_") : -len(suffix)]
                if step := dict(labels).get("step"):
                    key = f"{key}.{step}"
                sums.setdefault(key, [0.0, 0.0])[index] += value
    return {name: round(1000 * total / count, 2) for name, (total, count) in sorted(sums.items()) if count}


def engine_steps(means_ms: dict[str, float]) -> dict[str, float]:
    """The engine's own steps among the histogram means (lane_wait...), by step."""
    return {name.split(".", 1)[1]: ms for name, ms in means_ms.items() if name.startswith("engine_step.")}


def stage_medians(results: list[Any]) -> dict[str, float]:
    """Median of each step a job's result times (decode, batch wait, inference of its batch...):
    which step grows when a run slows down, without a profiler."""
    timings = [r.result["timings_ms"] for r in results]
    return {step: round(statistics.median(t[step] for t in timings if step in t), 2) for step in timings[0]}


def sample_boxes(settings: Settings, spec: ModelSpec, count: int = 40) -> dict[str, list[Any]]:
    """Boxes of real photos through the TensorRT backend, one at a time (no batch companions)."""
    from worker.compute.graph import engine_output
    from worker.compute.imaging import ByteBudget, Limits, prepare
    from worker.compute.postprocess import text_boxes

    backend = open_engine(settings, spec, 1)
    try:
        out = {}
        for photo in sample_photos()[:: max(len(sample_photos()) // count, 1)][:count]:
            p = prepare(photo.read_bytes(), spec, Limits(40_000_000, 1 << 30), ByteBudget(1 << 30))
            lane = backend.lanes(p.bucket.id)[0]
            lane.input(1, p.height, p.width)[0] = p.pixels
            prob = lane.run(1, p.height, p.width)[engine_output(spec)]
            out[photo.name] = text_boxes(prob[0, 0], spec.postprocess, p.original_height, p.original_width)
        return out
    finally:
        backend.close()


def precision_env(precision: str) -> dict[str, str]:
    """The plan's settings, in this process's environment too (engines opened here build or find it)."""
    env = {
        "IMGWORKER_MODEL_SPEC": str(SPEC),
        "IMGWORKER_BACKEND__KIND": "tensorrt",
        "IMGWORKER_BACKEND__TENSORRT__FP16": "true" if precision == "fp16" else "false",
        "IMGWORKER_BACKEND__TENSORRT__TF32": "false",
        "IMGWORKER_BACKEND__TENSORRT__GPU_JPEG": os.environ.get("IMGWORKER_BACKEND__TENSORRT__GPU_JPEG", "true"),
    }
    os.environ.update(env)
    return env


def measure(args: argparse.Namespace) -> int:
    env = precision_env(args.precision)
    settings = Settings.load()
    spec = load_model_spec(SPEC)
    from worker.backends.tensorrt.build import plan_for

    started = time.monotonic()
    plan = plan_for(spec, settings.onnx_path(spec.onnx), settings.backend.tensorrt)
    meta = json.loads(plan.with_suffix(".json").read_text())
    print(f"plan {plan.name}: built in {meta['build_s']} s, found in {time.monotonic() - started:.1f} s", flush=True)

    uniform_shape = uniform_batch_shape(spec)
    counts = sorted({*CONTEXTS, args.contexts})
    backend = open_engine(settings, spec, max(counts))
    try:
        info = backend.describe()
        raw = {"gpu_only": gpu_only_img_s(backend, "m512", uniform_shape[1:])}
        uniform_batches = real_pixels(settings, spec, [uniform_shape] * 8)
        for contexts in counts:
            raw[f"contexts_{contexts}"] = loop_lanes(backend, uniform_batches, contexts, args.seconds)
            print(f"raw engine, {contexts} contexts: {raw[f'contexts_{contexts}']:.0f} img/s", flush=True)
    finally:
        backend.close()

    results: dict[str, Any] = {
        "precision": args.precision,
        "date": datetime.date.today().isoformat(),
        "gpu": info.get("device"),
        "tensorrt": info.get("tensorrt"),
        "cpus": len(os.sched_getaffinity(0)),
        "plan": plan.name,
        "redis": "a three-master Redis Cluster" if args.cluster else "one redis-server",
        "build_s": meta["build_s"],
        "env": args.env,  # worker settings given with --env, shown on the report's lines
        "uniform_shape": list(uniform_shape),
        "raw": raw,
    }
    extra = {f"IMGWORKER_{k}": v for k, v in (item.split("=", 1) for item in args.env)}
    worker_env = {**env, "IMGWORKER_BACKEND__TENSORRT__INSTANCES": str(args.contexts), **extra}
    uniform = resized_jpegs(UNIFORM_SIZE, args.jobs)
    sweep = {}
    for processes in args.processes:  # choose the process count by measuring it
        run = worker_run(uniform, processes, worker_env, cluster=args.cluster)
        sweep[processes] = run
        print(
            f"worker, uniform, {processes} processes: {run['img_s']:.0f} img/s, p50 {run['p50_ms']:.0f} ms, "
            f"p99 {run['p99_ms']:.0f} ms, mean batch {run['mean_batch']:.1f}, {run['cores']:.1f} cores "
            f"(engine server {run['server_cores']:.1f}), window full {run['window_full_s']:.1f} s per worker; "
            f"mean ms {run['means_ms']}",
            flush=True,
        )
    best = max(sweep, key=lambda p: sweep[p]["img_s"])
    results["sweep"] = {p: without_batch_mix(r) for p, r in sweep.items()}

    def save() -> None:
        """After each stage: a run cut short (a device call's time limit) keeps what it measured."""
        args.out.write_text(json.dumps(results, indent=1))

    save()
    uniform_runs = [
        sweep[best],
        *(worker_run(uniform, best, worker_env, cluster=args.cluster) for _ in range(args.repeat - 1)),
    ]
    results["uniform"] = repeated(uniform_runs, "uniform")
    save()
    mixed = mixed_corpus(args.jobs // 2)  # a steady window over 10 s at the mixed corpus's rate
    results["mixed"] = repeated(
        [worker_run(mixed, best, worker_env, cluster=args.cluster) for _ in range(args.repeat)], "mixed"
    )
    save()
    backend = open_engine(settings, spec, max(counts))
    try:
        mix = [(b, n, h, w) for b, n, h, w, count in results["mixed"]["batch_mix"] for _ in range(int(count))]
        replay = real_pixels(settings, spec, [mix[i] for i in np.random.default_rng(1).permutation(len(mix))[:200]])
        results["mixed"]["raw"] = {f"contexts_{c}": loop_lanes(backend, replay, c, args.seconds) for c in counts}
    finally:
        backend.close()
    results["boxes"] = sample_boxes(settings, spec)
    save()
    print(f"written {args.out}", flush=True)
    return 0


def repeated(runs: list[dict[str, Any]], corpus: str) -> dict[str, Any]:
    """The run of median images/s, with every run's images/s and vCPU-ms per image beside it."""
    median_run = sorted(runs, key=lambda r: r["img_s"])[len(runs) // 2]
    rates = [r["img_s"] for r in runs]
    cpu = [r["vcpu_ms_per_image"] for r in runs]
    print(
        f"worker, {corpus}, {median_run['processes']} processes, {len(runs)} runs: median {median_run['img_s']:.0f} "
        f"img/s (spread {min(rates):.0f}-{max(rates):.0f}), {median_run['vcpu_ms_per_image']:.2f} vCPU-ms per image "
        f"({min(cpu):.2f}-{max(cpu):.2f}), Redis {median_run['redis_vcpu_ms_per_image']:.2f}, "
        f"p50 {median_run['p50_ms']:.0f} ms, p99 {median_run['p99_ms']:.0f} ms, "
        f"decode paths {median_run['decode_paths']}; engine server {median_run['server_cores']:.1f} of "
        f"{median_run['cores']:.1f} cores; mean ms per batch in the engine {engine_steps(median_run['means_ms'])}",
        flush=True,
    )
    return {**median_run, "runs_img_s": rates, "runs_vcpu_ms_per_image": cpu}


def uniform_batch_shape(spec: ModelSpec) -> tuple[str, int, int, int]:
    """(bucket, n, h, w) of a full batch of the uniform corpus: the m512 bucket's max batch, no padding."""
    return ("m512", spec.bucket("m512").max[0], UNIFORM_SIZE[1], UNIFORM_SIZE[0])


def decode_load(args: argparse.Namespace) -> int:
    """Images/s of the device's decoder on full batches of the uniform corpus's JPEGs, alone and
    beside ``loop_lanes`` at each context count: the engine's kernels slow the JPEG engines' batches."""
    from worker.backends.tensorrt._cuda import DeviceBuffer
    from worker.backends.tensorrt.jpeg_decoder import DECODE_BATCH

    precision_env(args.precision)
    settings = Settings.load()
    spec = load_model_spec(SPEC)
    bucket, n, height, width = uniform_batch_shape(spec)
    backend = open_engine(settings, spec, max(args.contexts))
    target = DeviceBuffer(DECODE_BATCH * height * width * spec.channels)
    try:
        if backend.jpeg_decoder is None:
            print("no GPU JPEG decoder here (see the log above)", flush=True)
            return 1
        items = [(slot, data, height, width) for slot, data in enumerate(resized_jpegs(UNIFORM_SIZE, DECODE_BATCH))]

        def decode_img_s(seconds: float) -> float:
            done, started = 0, time.monotonic()
            while time.monotonic() - started < seconds:
                failed = backend.jpeg_decoder.decode_into(target.address, height, width, spec.channels, items)
                assert not failed, f"slots {sorted(failed)} failed to decode"
                done += len(items)
            return done / (time.monotonic() - started)

        batches = real_pixels(settings, spec, [(bucket, n, height, width)] * 8)
        results: dict[str, Any] = {
            "precision": args.precision,
            "work_queues": os.environ["CUDA_DEVICE_MAX_CONNECTIONS"],  # set by _cuda unless given
            "engine_aux_streams": getattr(backend.engine, "num_aux_streams", None),
            "alone": decode_img_s(args.seconds),
            "loaded": {},
        }
        print(
            f"CUDA_DEVICE_MAX_CONNECTIONS={results['work_queues']}, engine auxiliary streams "
            f"{results['engine_aux_streams']}; decoder alone, batches of {len(items)}: {results['alone']:.0f} img/s",
            flush=True,
        )
        for contexts in args.contexts:
            with ThreadPoolExecutor(1) as pool:
                engine_run = pool.submit(loop_lanes, backend, batches, contexts, args.seconds + 1.0)
                time.sleep(0.5)  # the engine's lanes are busy before the decoder starts
                decoded = decode_img_s(args.seconds)
                engine_img_s = engine_run.result()
            results["loaded"][contexts] = {"decode_img_s": decoded, "engine_img_s": engine_img_s}
            print(f"decoder beside {contexts} contexts: {decoded:.0f} img/s, engine {engine_img_s:.0f}", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    finally:
        target.free()
        backend.close()
    return 0


def compare_variants(args: argparse.Namespace) -> int:
    """The worker on the uniform corpus under a few environments (driver settings such as
    CUDA_DEVICE_MAX_CONNECTIONS, worker settings such as IMGWORKER_BACKEND__TENSORRT__INSTANCES),
    taken in turn ``--rounds`` times, so that a drift of the machine touches every variant alike."""
    env = precision_env(args.precision)
    worker_env = {**env, "IMGWORKER_BACKEND__TENSORRT__INSTANCES": str(args.contexts)}
    variants = {text: dict(item.split("=", 1) for item in text.split(",")) for text in args.variants}
    uniform = resized_jpegs(UNIFORM_SIZE, args.jobs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, variant in variants.items():
            run = worker_run(uniform, args.processes, {**worker_env, **variant})
            runs[name].append(without_batch_mix(run))
            print(
                f"round {round_ + 1}, {name}: {run['img_s']:.0f} img/s, {run['vcpu_ms_per_image']:.2f} vCPU-ms per "
                f"image, p50 {run['p50_ms']:.0f} ms; engine ms per batch {engine_steps(run['means_ms'])}",
                flush=True,
            )
            args.out.write_text(json.dumps({"precision": args.precision, "runs": runs}, indent=1))
    first = next(iter(variants))
    base = statistics.median(r["img_s"] for r in runs[first])
    for name, done in runs.items():
        rate = statistics.median(r["img_s"] for r in done)
        print(f"{name}: median {rate:.0f} img/s, {rate / base:.2f} of {first}", flush=True)
    return 0


def raw_child(args: argparse.Namespace) -> int:
    """One GPU's raw engine for ``raw_engines``: open it, say so, loop when told, print images/s."""
    precision_env(args.precision)
    settings = Settings.load()
    spec = load_model_spec(SPEC)
    uniform_shape = uniform_batch_shape(spec)
    backend = open_engine(settings, spec, args.contexts)
    try:
        batches = real_pixels(settings, spec, [uniform_shape] * 8)
        loop_lanes(backend, batches, args.contexts, 1.0)  # warm every lane up before the barrier
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps({"img_s": loop_lanes(backend, batches, args.contexts, args.seconds)}), flush=True)
    finally:
        backend.close()
    return 0


def raw_engines(devices: list[int], precision: str, contexts: int, seconds: float) -> list[float]:
    """Images/s of each GPU's raw engine (uniform batches, copies included), all looping at once:
    what the GPUs give together with no worker in the way. One process per GPU, started together."""
    import subprocess

    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "raw-child",
                *("--precision", precision),
                *("--contexts", str(contexts)),
                *("--seconds", str(seconds)),
            ],
            env={**os.environ, "IMGWORKER_BACKEND__TENSORRT__DEVICE": str(device)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for device in devices
    ]
    for child in children:  # the barrier: every engine open and warm before any loop starts
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", "a raw engine failed"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    rates = [float(json.loads(child.communicate()[0])["img_s"]) for child in children]
    assert all(child.returncode == 0 for child in children)
    return rates


def jobs_by_gpu(metrics: dict[Any, float]) -> dict[str, float]:
    """Jobs each GPU's workers settled, from the supervisor's merged series (label worker=gpuN-...)."""
    out: dict[str, float] = {}
    for (name, labels), value in metrics.items():
        worker = dict(labels).get("worker", "")
        if name == "imgworker_jobs_completed_total" and worker.startswith("gpu"):
            gpu = worker.split("-", 1)[0]
            out[gpu] = out.get(gpu, 0.0) + value
    return out


def scale_gpus(args: argparse.Namespace) -> int:
    """The uniform corpus on one GPU, then on several, ``--processes`` workers per GPU each time;
    the raw engines first, each GPU alone and all at once. With ``--cpu-share`` the one-GPU run
    (its workers and Redis) may use only its share of the host's CPUs, as on a machine with one
    GPU and that many cores; the several-GPU run uses them all."""
    from worker.supervisor import visible_gpus

    env = precision_env(args.precision) | {"IMGWORKER_BACKEND__TENSORRT__INSTANCES": str(args.contexts)}
    devices = visible_gpus(args.gpus)
    if len(devices) < 2:
        raise SystemExit(f"--gpus {args.gpus} names {len(devices)} GPU(s); this compares one with several")
    raw = {
        "one": raw_engines(devices[:1], args.precision, args.contexts, args.seconds),
        "all": raw_engines(devices, args.precision, args.contexts, args.seconds),
    }
    print(f"raw engine: GPU {devices[0]} alone {raw['one'][0]:.0f} img/s, all at once {raw['all']}", flush=True)
    host_cpus = sorted(os.sched_getaffinity(0))
    uniform = resized_jpegs(UNIFORM_SIZE, args.jobs)
    runs = {}
    for group in (devices[:1], devices):
        gpus = ",".join(map(str, group))
        cpus = host_cpus[: len(host_cpus) // len(devices)] if len(group) == 1 and args.cpu_share else host_cpus
        os.sched_setaffinity(0, cpus)  # the workers and Redis started from here inherit it
        try:
            run = worker_run(uniform, args.processes, env, gpus=gpus, cluster=args.cluster)
        finally:
            os.sched_setaffinity(0, host_cpus)
        runs[gpus] = run = {**run, "cpus": len(cpus)}
        print(
            f"worker, uniform, GPUs {gpus}, {args.processes} processes each, {len(cpus)} CPUs: "
            f"{run['img_s']:.0f} img/s (all workers busy: {run['busy_img_s']:.0f}), p50 {run['p50_ms']:.0f} ms, "
            f"p99 {run['p99_ms']:.0f} ms, {run['cores']:.1f} cores, Redis {run['redis_cores']:.1f}, "
            f"jobs by GPU {run['jobs_by_gpu']}; median ms per step {run['stages_ms']}; mean ms {run['means_ms']}; "
            f"window full {run['window_full_s']:.1f} s per worker",
            flush=True,
        )
    one, many = runs.values()
    result = {
        "precision": args.precision,
        "date": datetime.date.today().isoformat(),
        "cpus": len(host_cpus),
        "cpu_share": args.cpu_share,
        "gpus": len(devices),
        "redis": "a three-master Redis Cluster" if args.cluster else "one redis-server",
        "raw": raw,
        "one": {k: v for k, v in one.items() if k != "batch_mix"},
        "many": {k: v for k, v in many.items() if k != "batch_mix"},
        "speedup": many["img_s"] / one["img_s"],
    }
    print(f"{len(devices)} GPUs over one: {result['speedup']:.2f}x", flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


# ---- report --------------------------------------------------------------------------------


def redis_short(run: dict[str, Any]) -> str:
    return "cluster" if "Cluster" in run.get("redis", "") else "1 Redis"


def setup(run: dict[str, Any]) -> str:
    """What differs between runs of one precision: the process counts tried, the Redis, the cores, the machine."""
    tried = ", ".join(str(p) for p in sorted(int(p) for p in run.get("sweep", {})))
    redis = run.get("redis", "one redis-server")
    processes = f"{run['uniform']['processes']} of {tried} worker processes"
    settings = "".join(f"; {item}" for item in run.get("env", []))
    return f"{processes}; {redis}; {run['cpus']} CPU cores{settings}; {run['source']}"


def label(run: dict[str, Any]) -> str:
    settings = "".join(f", {item}" for item in run.get("env", []))
    return f"{run['precision']}, {run['cpus']} cores, {redis_short(run)}{settings}, {run['source']}"


def context_counts(raw: dict[str, float]) -> list[int]:
    return sorted(int(key.split("_")[1]) for key in raw if key.startswith("contexts_"))


def ratio(run: dict[str, Any], raw: dict[str, float]) -> float:
    return float(run["img_s"] / max(v for k, v in raw.items() if k.startswith("contexts_")))


def box_agreement(fp32: dict[str, list[Any]], fp16: dict[str, list[Any]]) -> tuple[int, int]:
    """(clear boxes, clear boxes without a counterpart), both ways."""
    clear = missing = 0
    for name in fp32.keys() & fp16.keys():
        for a, b in ((fp32[name], fp16[name]), (fp16[name], fp32[name])):
            clear += sum(1 for box in a if box["score"] >= CLEAR_SCORE)
            missing += len(unmatched(a, b, BOX_IOU, CLEAR_SCORE))
    return clear, missing


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """One group of bars per run: the engine and the worker, on the uniform and the mixed corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def best_engine(raw: dict[str, float]) -> float:
        return max(v for k, v in raw.items() if k.startswith("contexts_"))

    bars: list[tuple[str, list[float], str]] = [  # (legend, a value per run, colour)
        ("engine, uniform batches", [best_engine(r["raw"]) for r in runs], "#9db4c0"),
        ("worker, uniform 512x384 JPEGs", [r["uniform"]["img_s"] for r in runs], "#2a6f97"),
        ("engine, the mixed batch mix", [best_engine(r["mixed"]["raw"]) for r in runs], "#f6d5b0"),
        ("worker, mixed real photos", [r["mixed"]["img_s"] for r in runs], "#e76f51"),
    ]
    height = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(runs) + 1.5), layout="constrained")
    for i, (legend, values, colour) in enumerate(bars):
        ax.barh([n + i * height for n in range(len(runs))], values, height, label=legend, color=colour)
    ax.set_yticks([n + 0.4 - height / 2 for n in range(len(runs))])
    ax.set_yticklabels([f"{r['precision']}\n{r['uniform']['processes']} workers, {r['cpus']} vCPUs" for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    ax.set_title(f"One {runs[0]['gpu']}, TensorRT {runs[0]['tensorrt']}: the engine alone and the worker end to end")
    fig.savefig(path, dpi=110)


def report(args: argparse.Namespace) -> int:
    runs = [{**json.loads(p.read_text()), "source": p.parent.name} for p in args.results]
    first = runs[0]
    out = args.out_dir / "report.md"
    plot(runs, args.plot)
    lines = [
        "# Every measured run",
        "",
        f"Measured on lent GPU machines ({first['gpu']}, TensorRT {first['tensorrt']}; each run's CPU cores, "
        "Redis and source folder under `docs/measurements/`, which names the machine and the session, are on its "
        "ratio line) by `scripts/bench_gpu.py`, one plan per precision "
        f"(`tests/gpu/spec_small.yaml`: buckets s256 up to 16x256x256 and m512 up to 16x512x512; TF32 off).",
        "",
        "Ratios: the worker end to end (from Redis, steady window) over the best raw engine figure "
        "(1, 2 or 4 contexts with copies) on the same plan and batch shapes:",
        "",
    ]
    for run in runs:
        for corpus in ("uniform", "mixed"):
            raw = run["raw"] if corpus == "uniform" else run["mixed"]["raw"]
            lines.append(f"    ratio {corpus} {run['precision']}: {ratio(run[corpus], raw):.2f}   ({setup(run)})")
    lines += [
        "",
        f"![images/s per configuration]({os.path.relpath(args.plot, args.out_dir)})",
        "",
        "p50/p99: from a worker reading a job to its result (every job is queued before the workers start).",
        "",
        "| run | what | images/s | p50 ms | p99 ms | mean batch | CPU cores |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        p, raw = label(run), run["raw"]
        n, h, w = run["uniform_shape"][1:]
        lines.append(f"| {p} | engine, GPU time only (CUDA events), {n}x{h}x{w} | {raw['gpu_only']:.0f} | | | | |")
        for c in context_counts(raw):
            lines.append(
                f"| {p} | engine, {c} context(s) with copies, {n}x{h}x{w} | {raw[f'contexts_{c}']:.0f} | | | | |"
            )
        for processes, r in sorted(run.get("sweep", {}).items(), key=lambda kv: int(kv[0])):
            if r is not run["uniform"] and int(processes) != run["uniform"]["processes"]:
                lines.append(
                    f"| {p} | worker, uniform corpus, {r['jobs']} jobs, {processes} process(es) | {r['img_s']:.0f} | "
                    f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['cores']:.1f} |"
                )
        for corpus in ("uniform", "mixed"):
            r = run[corpus]
            lines.append(
                f"| {p} | worker, {corpus} corpus, {r['jobs']} jobs, {r['processes']} process(es) | {r['img_s']:.0f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['cores']:.1f} |"
            )
        for c in context_counts(run["mixed"]["raw"]):
            replay = run["mixed"]["raw"][f"contexts_{c}"]
            lines.append(f"| {p} | engine replaying the mixed batch mix, {c} context(s) | {replay:.0f} | | | | |")
    fp = {run["precision"]: run for run in runs}
    if {"fp32", "fp16"} <= fp.keys():
        clear, missing = box_agreement(fp["fp32"]["boxes"], fp["fp16"]["boxes"])
        lines += [
            "",
            f"fp16 against fp32 on {len(fp['fp32']['boxes'])} real photos: {clear} boxes scoring at least "
            f"{CLEAR_SCORE} (both ways), {missing} without a counterpart of IoU >= {BOX_IOU}.",
        ]
    cpu_files = args.cpu or []
    if cpu_files:
        lines += ["", "## The CPU side alone (`scripts/bench_cpu.py --backend fake`)", ""]
    for path in cpu_files:
        cpu = json.loads(path.read_text())
        lines.append(
            f"- {path.parent.name}: {cpu['jobs']} {cpu['size']} JPEGs, {cpu['processes']} worker processes, the fake "
            f"backend (a recorded map, no model): the worker ran {cpu['img_s']:.0f} images/s on {cpu['cores']:.2f} "
            f"cores = **{cpu['per_core']:.0f} images/s per core**; a one-image-at-a-time loop does "
            f"{cpu['baseline_img_s']:.0f} per core on the same machine."
        )
    for path in args.gpus or []:
        lines += gpus_section(json.loads(path.read_text()), path.parent.name)
    if args.redis:
        lines += redis_section(json.loads(args.redis.read_text()), args.out_dir / "report-redis.png")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


def gpus_section(data: dict[str, Any], source: str) -> list[str]:
    share = data.get("cpu_share", False)
    lines = [
        "",
        f"## Several GPUs (`scripts/bench_gpu.py gpus --precision {data['precision']}"
        f"{' --cluster' if 'Cluster' in data.get('redis', '') else ''}{' --cpu-share' if share else ''}`)",
        "",
        f"The uniform corpus through `imgworker run --gpus`, {data['one']['processes']} worker processes per GPU, "
        f"one engine server per GPU, jobs on {data.get('redis', 'one redis-server')}, on a host with "
        f"{data['gpus']} GPUs and {data['cpus']} CPU cores"
        f"{' (the one-GPU run on its share of them)' if share else ''}, measured {data['date']} ({source}):",
        "",
        "| GPUs | CPUs | jobs | images/s | all workers busy | p50 ms | p99 ms | mean batch | worker CPU cores "
        "| Redis cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count, run in ((1, data["one"]), (data["gpus"], data["many"])):
        busy = f"{run['busy_img_s']:.0f}" if "busy_img_s" in run else "-"
        lines.append(
            f"| {count} | {run.get('cpus', data['cpus'])} | {run['jobs']} | {run['img_s']:.0f} | {busy} | "
            f"{run['p50_ms']:.0f} | {run['p99_ms']:.0f} | {run['mean_batch']:.1f} | {run['cores']:.1f} | "
            f"{run['redis_cores']:.2f} |"
        )
    lines += ["", f"    {data['gpus']} GPUs over one: {data['speedup']:.2f}x"]
    if raw := data.get("raw"):
        together = raw["all"]
        lines.append(
            f"    raw engines: {raw['one'][0]:.0f} images/s on one GPU alone, {sum(together):.0f} on all at once "
            f"({' + '.join(f'{r:.0f}' for r in together)}): {sum(together) / raw['one'][0]:.2f}x"
        )
    return lines


def redis_section(data: dict[str, Any], png: Path) -> list[str]:
    rows = data["rows"]
    plot_redis(rows, png)
    lines = [
        "",
        "## How far one Redis goes (`scripts/bench_redis.py --cluster`)",
        "",
        f"Independent `imgworker run` processes with the fake backend (no model: only Redis, decoding and "
        f"postprocessing cost anything) against one redis-server and against a three-master Redis Cluster "
        f"(a replica each, {data['shards']} job shards), on {data['cpus']} CPU cores; every job submitted "
        "before the workers start. Redis cores: CPU time of every redis-server process over the steady window.",
        "",
        f"![images/s against worker processes]({png.name})",
        "",
        "| Redis | image | workers | images/s | MB/s | worker cores | Redis cores | Redis core-ms per image: "
        "submit + work |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['size']} ({r['kb']} KB) | {r['workers']} | {r['img_s']:.0f} | {r['mb_s']:.0f} | "
            f"{r['worker_cores']:.1f} | {r['redis_cores']:.2f} | {r['redis_submit_core_ms_per_image']:.3f} + "
            f"{r['redis_work_core_ms_per_image']:.3f} |"
        )
    lines += [
        "",
        "Where one redis-server stops: it runs commands on one thread, so it is full at one core, and every "
        "image costs it the submission (XADD of the bytes) plus the work (the read, the settle script).",
    ]
    for size in dict.fromkeys(r["size"] for r in rows):
        single = [r for r in rows if r["size"] == size and r["target"] == "redis"]
        best = max(single, key=lambda r: r["img_s"])
        cost = statistics.median(
            r["redis_submit_core_ms_per_image"] + r["redis_work_core_ms_per_image"] for r in single
        )
        lines.append(
            f"- {size}: submission and work cost a median {cost:.3f} core-ms per image, so one Redis serving "
            f"producers and workers at once is full near **{1000 / cost:.0f} images/s** "
            f"({1000 / cost * best['kb'] / 1000:.0f} MB/s); here, the submissions done first, the workers alone "
            f"reached {best['img_s']:.0f} images/s ({best['workers']} workers, "
            f"Redis at {best['redis_cores']:.2f} cores)."
        )
    return lines


def plot_redis(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for target in dict.fromkeys(r["target"] for r in rows):
            points = sorted((r["workers"], r["img_s"]) for r in rows if r["size"] == size and r["target"] == target)
            ax.plot(*zip(*points, strict=True), marker="o", label=target)
        ax.set_title(f"{size} JPEGs, fake backend")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("images/s")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--precision", choices=("fp32", "fp16"), required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--jobs", type=int, default=40000, help="uniform jobs per run (the mixed corpus runs half)")
    m.add_argument("--repeat", type=int, default=3, help="runs of each corpus; the median is reported")
    m.add_argument("--seconds", type=float, default=5.0, help="per raw engine configuration")
    m.add_argument(
        "--processes",
        type=lambda text: [int(p) for p in text.split(",")],
        default=[1],
        help="worker process counts to try (comma-separated); the best runs the mixed corpus too",
    )
    m.add_argument("--contexts", type=int, default=4, help="execution contexts per bucket in the engine")
    m.add_argument("--cluster", action="store_true", help="jobs on a local Redis Cluster (one Redis caps ~6000/s)")
    m.add_argument("--env", nargs="*", default=[], metavar="SECTION__FIELD=VALUE", help="more worker settings")
    m.set_defaults(handler=measure)
    g = sub.add_parser("gpus", help="the uniform corpus on one GPU and on several")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--gpus", default="all", metavar="all|0,1")
    g.add_argument("--processes", type=int, default=4, help="worker processes per GPU")
    g.add_argument("--jobs", type=int, default=16000)
    g.add_argument("--contexts", type=int, default=4, help="execution contexts per bucket in each engine")
    g.add_argument("--cluster", action="store_true", help="jobs on a local Redis Cluster (one Redis caps ~6000/s)")
    g.add_argument("--seconds", type=float, default=5.0, help="of each raw engine run")
    g.add_argument(
        "--cpu-share", action="store_true", help="the one-GPU run gets only its share of the CPUs (cpus / GPUs)"
    )
    g.set_defaults(handler=scale_gpus)
    d = sub.add_parser("decode-load", help="the GPU's JPEG decoder alone and beside the engine")
    d.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--contexts", type=lambda text: [int(c) for c in text.split(",")], default=[1, 2, 4, 8])
    d.add_argument("--seconds", type=float, default=3.0, help="of decoding at each context count")
    d.set_defaults(handler=decode_load)
    v = sub.add_parser("variants", help="the worker on the uniform corpus under a few environments, in turns")
    v.add_argument("--precision", choices=("fp32", "fp16"), required=True)
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--variants", nargs="+", required=True, metavar="NAME=VALUE[,NAME=VALUE]")
    v.add_argument("--rounds", type=int, default=2)
    v.add_argument("--jobs", type=int, default=40000)
    v.add_argument("--processes", type=int, default=12)
    v.add_argument("--contexts", type=int, default=8, help="execution contexts per bucket in the engine")
    v.set_defaults(handler=compare_variants)
    c = sub.add_parser("raw-child", help=argparse.SUPPRESS)  # one GPU's engine for `gpus`
    c.add_argument("--precision", choices=("fp32", "fp16"), required=True)
    c.add_argument("--contexts", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.set_defaults(handler=raw_child)
    r = sub.add_parser("report")
    r.add_argument("results", type=Path, nargs="+")
    r.add_argument("--cpu", type=Path, nargs="*", help="bench_cpu.py --json outputs")
    r.add_argument("--gpus", type=Path, nargs="*", help="bench_gpu.py gpus outputs")
    r.add_argument("--redis", type=Path, help="bench_redis.py --json output")
    r.add_argument("--out-dir", type=Path, default=REPO / "docs" / "measurements", help="report.md and its plots")
    r.add_argument("--plot", type=Path, default=REPO / "docs" / "performance.png", help="the one-plot summary")
    r.set_defaults(handler=report)
    args = parser.parse_args()
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
