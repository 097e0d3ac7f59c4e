"""A real Redis Cluster on loopback ports: six redis-server processes joined by redis-cli."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support.redis_server import free_port


def _node_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    while True:
        port = free_port()
        if port < 55_000:
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 10_000))
                return port
            except OSError:
                continue


class Cluster:
    """Six redis-server processes (AOF, fsync every second), joined by `redis-cli --cluster create`."""

    def __init__(self, workdir: Path) -> None:
        self.ports = [_node_port() for _ in range(6)]
        self.workdir = workdir
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        binary = shutil.which("redis-server")
        assert binary is not None
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        folder = self.workdir / str(port)
        folder.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                *(self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""),
                *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0"),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(folder / "log")),
            ],
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).ping())
        subprocess.run(
            [
                *("redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
        )
        self.wait_ok()

    def wait_ok(self) -> None:
        def ok() -> bool:
            live = [p for p, proc in self.processes.items() if proc.poll() is None]
            if not all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in live):
                return False
            # replicas that never synced with their master would not take over from it
            roles = [redis.Redis(port=p).info("replication") for p in live]
            return all(r.get("master_link_status", "up") == "up" for r in roles)

        self._wait(ok, 30)

    @staticmethod
    def _wait(check: object, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.1)

    def masters(self) -> list[int]:
        nodes = redis.Redis(port=self.ports[0]).cluster("nodes")
        return [
            int(address.split(":")[1].split("@")[0])
            for address, node in nodes.items()
            if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]
        ]

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()
