"""A throwaway redis-server process on a free port, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server process; tests stop, kill and restart it (same port) to cut Redis off."""

    def __init__(self, workdir: Path, *extra: str, tls: dict[str, Path] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra = list(extra)
        self.tls = tls
        scheme = "rediss" if tls else "redis"
        self.url = f"{scheme}://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        base = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", ""]
        if self.tls:
            base += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "optional"]
            base += ["--tls-cert-file", str(self.tls["cert"]), "--tls-key-file", str(self.tls["key"])]
            base += ["--tls-ca-cert-file", str(self.tls["ca"])]
        else:
            base += ["--port", str(self.port)]
        if "--appendonly" not in self.extra:
            base += ["--appendonly", "no"]
        return base + self.extra

    def client(self) -> redis.Redis:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls["ca"]))
        if "--requirepass" in self.extra:
            options["password"] = self.extra[self.extra.index("--requirepass") + 1]
        return redis.Redis(**options)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL)
        client = self.client()
        for _ in range(400):
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                time.sleep(0.025)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        """SIGKILL: whatever it had not written to disk is lost, as when a host dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
