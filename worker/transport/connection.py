"""Redis connections for both sides (worker and producer): TLS, credentials, retries, error mapping.

Every redis-py exception is translated here and only here: a refused password or permission is a
ConfigError (fatal, exit 2: retrying cannot fix it); anything else is a BrokerError (transient).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.core.errors import BrokerError, ConfigError, RedisRefusedError
from worker.core.logs import Outage
from worker.core.protocol import Keys
from worker.core.settings import RedisSettings

_FATAL = (AuthenticationError, AuthorizationError, NoPermissionError)
#: how long a readiness probe waits for Redis's answer: a worker is not ready a second or two after
#: Redis stops answering (frozen, partitioned), not after the retries of ordinary calls (~40 s)
PROBE_TIMEOUT_S = 1.5
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """The one retry policy above redis-py's own (which retries a single command a few times): how
    long to wait before trying a call again after a BrokerError (Redis away, a timeout, a failover)."""

    first_s: float
    cap_s: float

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * 2, self.cap_s)


#: the worker's calls: every half second until Redis answers or the worker stops; never given up,
#: since the worker holds entries that only Redis can take back
WORKER_BACKOFF = Backoff(0.5, 0.5)
#: a producer's calls: from 50 ms, doubling up to 1 s, until its caller's deadline
PRODUCER_BACKOFF = Backoff(0.05, 1.0)


async def until_answered(
    call: Callable[[], Awaitable[T]],
    outage: Outage,
    *,
    pause: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    stopped: Callable[[], bool] = lambda: False,
) -> tuple[bool, T | None]:
    """``call`` under WORKER_BACKOFF: (True, its result) once Redis takes it, (False, None) once
    ``stopped``. The outage is logged once when it starts and once when it ends."""
    for delay in WORKER_BACKOFF.delays():
        if stopped():
            break
        try:
            result = await call()
        except BrokerError as exc:
            outage.failed(exc)
            await pause(delay)
            continue
        outage.recovered()
        return True, result
    return False, None


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def connection_options(settings: RedisSettings, probe: bool = False) -> dict[str, Any]:
    """redis-py keyword arguments beyond the URL: credentials, TLS, timeouts and retries (a probe's:
    short, and none)."""
    options: dict[str, Any] = (
        {
            "socket_timeout": PROBE_TIMEOUT_S,
            "socket_connect_timeout": PROBE_TIMEOUT_S,
            "retry": Retry(NoBackoff(), retries=0),
        }
        if probe
        else {
            "socket_timeout": settings.socket_timeout_s + settings.block_ms / 1000,
            "socket_connect_timeout": settings.socket_timeout_s,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            "health_check_interval": 30,
        }
    )
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if urlsplit(settings.url).scheme == "rediss":
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        options["ssl_check_hostname"] = settings.tls_check_hostname
        if settings.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.tls_ca_file)
        if settings.tls_cert_file is not None:
            options["ssl_certfile"] = str(settings.tls_cert_file)
        if settings.tls_key_file is not None:
            options["ssl_keyfile"] = str(settings.tls_key_file)
    return options


def connect(settings: RedisSettings, probe: bool = False) -> Any:
    """A Redis client, or a cluster client (same commands; multi-key calls must stay in one slot)."""
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **connection_options(settings, probe))
    return aioredis.Redis.from_url(settings.url, **connection_options(settings, probe))


def keys_for(settings: RedisSettings) -> Keys:
    """The key layout: hash-tagged by shard on a cluster or with several shards, plain otherwise."""
    return Keys(settings.prefix, settings.shards, tagged=settings.cluster or settings.shards > 1)


def broker_error(what: str, exc: RedisError | RedisClusterException, url: str) -> Exception:
    """The project's error for a redis-py one: ConfigError when credentials are refused."""
    detail = str(exc).replace(url, redact(url)) if url else str(exc)
    if isinstance(exc, _FATAL):
        return ConfigError(f"redis at {redact(url)} refused the credentials ({what}): {detail}")
    if isinstance(exc, RedisConnectionError) and "CERTIFICATE_VERIFY_FAILED" in detail:
        return ConfigError(f"redis at {redact(url)}: TLS certificate verification failed: {detail}")
    if isinstance(exc, OutOfMemoryError):  # redis-py drops the OOM code from the message
        reason = detail if detail.startswith("out of memory") else f"out of memory: {detail}"
        return RedisRefusedError(f"redis {what} refused: {reason}")
    if isinstance(exc, ResponseError) and detail.startswith("WRONGTYPE"):
        return RedisRefusedError(f"redis {what} refused: {detail}")
    return BrokerError(f"redis {what} failed: {detail}")


def _raised_inside_redis_py(exc: BaseException) -> bool:
    """True when the innermost frame of the exception's traceback is redis-py's own code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


@contextmanager
def mapped(what: str, url: str = "") -> Iterator[None]:
    """Translate redis-py exceptions raised inside the block (see ``broker_error``)."""
    try:
        yield
    # the cluster client's "no reachable node" and "slot not covered" (while a master fails over)
    # are not RedisErrors
    except (RedisError, RedisClusterException) as exc:
        raise broker_error(what, exc, url) from exc
    except AttributeError as exc:
        # redis-py's asyncio clients close a connection that another task is using when a node
        # fails (a cluster pipeline closes every one); that task then fails on the closed
        # connection's missing stream ("'NoneType' object has no attribute 'writelines'").
        # It is Redis going away, not a bug of ours: retried like any connection error.
        if not _raised_inside_redis_py(exc):
            raise
        raise BrokerError(f"redis {what} failed: its connection was closed under it ({exc})") from exc
