"""Redis Cluster for real: three masters with a replica each, on loopback ports, made by redis-cli."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import FAST_LEASE_ENV, worker_env
from tests.support.redis_cluster import Cluster
from tests.support.redis_server import free_port
from tests.support.workers import WorkerProcess
from worker.client import Client
from worker.core.errors import BrokerError
from worker.core.settings import RedisSettings
from worker.transport.broker import Broker
from worker.transport.connection import mapped

pytestmark = pytest.mark.slow
SHARDS = 6


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    made.start()
    yield made
    made.stop()


def _env(cluster: Cluster, **extra: str) -> dict[str, str]:
    return worker_env(
        cluster.url,
        **FAST_LEASE_ENV,
        IMGWORKER_REDIS__CLUSTER="true",
        IMGWORKER_REDIS__SHARDS=str(SHARDS),
        IMGWORKER_BACKEND__KIND="fake",
        **extra,
    )


def _jpegs(photos: list[Path], count: int) -> list[bytes]:
    sources = [cv2.imread(str(p)) for p in photos[:10]]
    return [cv2.imencode(".jpg", cv2.resize(sources[i % 10], (256, 192)))[1].tobytes() for i in range(count)]


def test_jobs_spread_over_the_masters_and_a_killed_worker_loses_none(cluster: Cluster, photos: list[Path]) -> None:
    settings = RedisSettings(url=cluster.url, cluster=True, shards=SHARDS)
    env = _env(cluster, IMGWORKER_BACKEND__FAKE__IMAGE_MS="50")
    with Client(redis_settings=settings) as client:
        ids = client.submit_many(_jpegs(photos, 200))
        holding = {port for port in cluster.masters() if redis.Redis(port=port).keys("imgworker:{*}:jobs:1")}
        with WorkerProcess(env) as first, WorkerProcess(env) as second:
            first.wait_ready()
            second.wait_ready()
            nodes = redis.RedisCluster.from_url(cluster.url)

            def held_by(worker: WorkerProcess) -> int:
                return sum(
                    len(nodes.xpending_range(stream, "workers", "-", "+", 1000, consumername=worker.consumer))
                    for stream in [f"imgworker:{{{s}}}:jobs:1" for s in range(SHARDS)]
                )

            # whichever worker read first may hold every job: kill the one holding jobs
            deadline = time.monotonic() + 10
            while max(orphaned := held_by(first), held_by(second)) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            victim = first if orphaned else second
            orphaned = orphaned or held_by(second)
            victim.process.send_signal(signal.SIGKILL)
            results = client.wait_many(ids, timeout_s=120)
            nodes.close()
    statuses = {r.status for r in results.values()}
    figure = (
        f"shards on {len(holding)} of 3 masters; a worker killed holding {orphaned} jobs; "
        f"{len(results)} of 200 results, statuses {statuses}"
    )
    print(figure)
    assert len(holding) >= 2 and orphaned > 0 and statuses == {"ok"}, figure


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_master_failing_over_under_load(cluster: Cluster, photos: list[Path], replicas: int) -> None:
    """SIGKILL to a master while jobs are submitted and run; its replica takes over, and the old
    master comes back as a replica. Producers that wait for a replica (``replicas=1``, Redis WAIT)
    lose none, and are refused while a shard has no replica; with fsync every second and no wait,
    the figure says how many acknowledged jobs were lost."""
    settings = RedisSettings(url=cluster.url, cluster=True, shards=SHARDS, replicas=replicas)
    jobs = _jpegs(photos, 40)
    submitted: list[str] = []
    with (
        WorkerProcess(_env(cluster, IMGWORKER_BACKEND__FAKE__IMAGE_MS="5")) as worker,
        Client(redis_settings=settings) as client,
    ):
        worker.wait_ready()
        stop = threading.Event()

        def produce() -> None:
            with Client(redis_settings=settings) as producer:
                while not stop.is_set():  # about 200 jobs/s: what the worker keeps up with
                    with contextlib.suppress(Exception):  # a submit that failed was not acknowledged
                        submitted.extend(producer.submit_many(jobs, timeout_s=20))
                    time.sleep(0.2)

        thread = threading.Thread(target=produce)
        thread.start()
        time.sleep(2.0)
        victim = next(p for p in cluster.masters() if p != cluster.ports[0])
        cluster.kill(victim)
        killed_with = len(submitted)
        time.sleep(6.0)  # failover: node timeout 2 s, then the election
        cluster.start_node(victim)  # it comes back as a replica: the shard has a replica again
        cluster.wait_ok()
        time.sleep(2.0)
        stop.set()
        thread.join()
        results = client.gather(submitted, timeout_s=60)
        worker_state = "worker running" if worker.process.poll() is None else f"worker exited {worker.process.poll()}"
        worker_log = worker.log
    lost = len(submitted) - len(results)
    statuses = {r.status for r in results.values()}
    figure = (
        f"replicas={replicas}: {len(submitted)} jobs acknowledged ({killed_with} before the master died), "
        f"{len(results)} results ({statuses}), {lost} lost"
    )
    print(figure)
    assert statuses <= {"ok"} and len(submitted) > killed_with > 0, figure
    if replicas:
        assert lost == 0, f"{figure}; {worker_state}; its log ends:\n{worker_log[-4000:]}"


async def test_a_cluster_with_no_reachable_node_is_a_broker_error() -> None:
    """redis-py's cluster client raises its own exceptions (no reachable node, a slot not covered
    while a master fails over) outside RedisError; the worker must see them as Redis being away
    and retry, not crash."""
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", cluster=True, socket_timeout_s=0.5)
    broker = Broker(settings)
    try:
        with pytest.raises(BrokerError, match="cannot be connected"):
            await broker.heartbeat()
        with pytest.raises(BrokerError):
            await broker.ensure_groups()
    finally:
        await broker.aclose()


async def test_a_connection_closed_under_a_call_is_redis_going_away_not_a_crash() -> None:
    """When a node fails, redis-py closes connections other tasks are using (a cluster pipeline
    closes them all); the call on such a connection fails inside redis-py with an AttributeError.
    Under a failover that ended a worker ("a pipeline task failed") with jobs in hand; it must be
    retried like a connection error. An AttributeError of our own stays a bug."""
    closed = aioredis.connection.Connection(port=free_port())  # no stream, as after a concurrent disconnect
    # redis-py < 8.2 fails there with an AttributeError, 8.2 with its own ConnectionError: either
    # way the worker sees a BrokerError (retried), whatever redis-py's words
    with pytest.raises(BrokerError), mapped("settle"):
        await closed._send_packed_command([b"PING"])
    with pytest.raises(AttributeError), mapped("settle"):
        _ = object().writelines  # type: ignore[attr-defined]


def _calls(ports: list[int], command: str) -> int:
    """How many times the nodes ran ``command`` (INFO commandstats, summed)."""
    name = f"cmdstat_{command}"
    return sum(int(redis.Redis(port=p).info("commandstats").get(name, {}).get("calls", 0)) for p in ports)


async def test_reclaim_reads_every_lease_once_whatever_the_shards(cluster: Cluster) -> None:
    """A reclaim pass asks each stream for its consumers once and each consumer for its lease once,
    pipelined, so its cost stays flat as shards x workers grow (it was one round trip per stream and
    consumer: 1,200 with 12 shards and 32 workers, on every worker's intake path), and it still
    claims exactly what a consumer without a lease left."""
    base = {"url": cluster.url, "cluster": True, "shards": SHARDS, "lease_s": 1.0, "retry_backoff_s": 60}
    brokers = [Broker(RedisSettings(**base, consumer=f"worker-{i}")) for i in range(8)]
    me, dead = brokers[0], brokers[-1]
    try:
        await me.ensure_groups()
        left_by_dead = set()
        for broker in brokers:
            await broker.heartbeat()
            for stream in broker.keys.streams:
                entry = await broker.redis.xadd(stream, {"image": b"x"})
                await broker.redis.xreadgroup(broker.settings.group, broker.consumer, {stream: ">"}, 1)
                if broker is dead:
                    left_by_dead.add(f"{stream}/{entry.decode()}")
        for broker in brokers[:-1]:
            await broker.heartbeat()  # fresh: they hold through the pass below
        await dead.redis.delete(dead.keys.lease(dead.consumer))
        await asyncio.sleep(0.6)  # every entry idles past lease_s / 2: only the lease tells them apart
        xinfo, exists = _calls(cluster.ports, "xinfo|consumers"), _calls(cluster.ports, "exists")
        claimed = await me.reclaim(set(), limit=1000)
        assert _calls(cluster.ports, "xinfo|consumers") - xinfo == len(me.keys.streams)
        assert _calls(cluster.ports, "exists") - exists == len(brokers) - 1  # every other consumer, once
        assert {d.key for d in claimed} == left_by_dead
        assert all(d.deliveries == 2 for d in claimed)
    finally:
        for broker in brokers:
            await broker.aclose()
