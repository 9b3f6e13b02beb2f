"""The shared store's connection to Redis: ``RedisLink``.

Every call of a ``RedisStore`` and of its ``RedisLocks`` (``daemon.coord.locks``)
goes through one link. It uses ``store.socket_timeout_s`` for connect and
read, retries a broken pooled connection once and never retries a timeout, so
a dead or unreachable Redis raises ``StoreUnavailable`` (the redis error is its
cause) within about one timeout. Any other Redis error (OOM, a script error)
raises ``StoreError``. The link keeps no down state of its own: it records
into the cache's ``Outage`` (``daemon.cache.outage``), whose fail-fast window
then fails its calls at once for a backoff; the cache guard reports it.
"""
from __future__ import annotations

from typing import Callable

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from daemon.cache.base import StoreError, StoreHealth, StoreUnavailable
from daemon.cache.outage import Outage
from daemon.config import StoreConfig

log = structlog.get_logger("rembgd.store")

OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisLink:
    """One Redis connection pool (see the module docstring). Shared by a ``RedisStore``
    and its ``RedisLocks``; thread-safe. ``outage``: the cache's (its guard reports it);
    a link of its own (a one-shot command, a test) gets a fresh one."""

    def __init__(self, store_cfg: StoreConfig, outage: Outage | None = None):
        self.url = store_cfg.url
        self.outage = outage if outage is not None else Outage()
        self.client = redis.Redis.from_url(
            store_cfg.url, socket_timeout=store_cfg.socket_timeout_s,
            socket_connect_timeout=store_cfg.socket_timeout_s, socket_keepalive=True,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0)

    def health(self) -> StoreHealth:
        """Whether Redis can be reached; probes it (one PING) once the backoff has passed."""
        if self.outage.probe_due:
            try:
                self.call(self.client.ping)
            except StoreError:
                pass
        down = self.outage.unreachable
        return StoreHealth(available=not down,
                           error=self.outage.unreachable_error if down else None)

    def call(self, fn: Callable, *args, **kw):
        """``fn(*args, **kw)``; Redis errors become ``StoreUnavailable``/``StoreError``."""
        self.outage.check(f"redis {redacted(self.url)}")
        try:
            result = fn(*args, **kw)
        except OUTAGE_ERRORS as exc:
            self.outage.unreachable_now(f"{type(exc).__name__}: {exc}")
            raise StoreUnavailable(f"redis {redacted(self.url)} unreachable: "
                                   f"{type(exc).__name__}: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # OOM, script or type errors: Redis answered
            raise StoreError(f"redis {redacted(self.url)}: {type(exc).__name__}: {exc}") from exc
        if self.outage.reached():
            log.info("redis_reachable", url=redacted(self.url))
        return result

    def close(self) -> None:
        self.client.close()


def redacted(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
