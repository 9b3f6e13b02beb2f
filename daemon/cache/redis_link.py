"""The shared store's connection to Redis and its outage breaker: ``RedisLink``.

Owns "can Redis be reached": every call of a ``RedisStore`` and of its
``RedisLocks`` (``daemon.coord.locks``) goes through one link. It uses
``store.socket_timeout_s`` for connect and read, retries a broken pooled
connection once and never retries a timeout, so a dead or unreachable Redis
raises ``StoreUnavailable`` (the redis error is its cause) within about one
timeout. After a failure the link fails fast with ``StoreUnavailable`` for a
backoff (0.5 s, doubling per consecutive failure, at most 30 s) before trying
again; the next successful call ends the outage. Any other Redis error (OOM,
a script error) raises ``StoreError``. ``health()`` reports the outage state
(and probes with one PING once the backoff has passed); the cache guard
(``daemon.cache.guard``) turns it into the status file and the log.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from daemon.cache.base import StoreError, StoreHealth, StoreUnavailable
from daemon.config import StoreConfig

log = structlog.get_logger("rembgd.store")

OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisLink:
    """One Redis connection pool and its outage breaker (see the module docstring).

    Shared by a ``RedisStore`` and its ``RedisLocks``. Thread-safe.
    """

    BACKOFF_START_S = 0.5
    BACKOFF_MAX_S = 30.0

    def __init__(self, store_cfg: StoreConfig):
        self.url = store_cfg.url
        self.client = redis.Redis.from_url(
            store_cfg.url, socket_timeout=store_cfg.socket_timeout_s,
            socket_connect_timeout=store_cfg.socket_timeout_s, socket_keepalive=True,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0)
        self._health = threading.Lock()
        self._down = False
        self._down_until = 0.0
        self._backoff = self.BACKOFF_START_S
        self.last_error: str | None = None

    @property
    def down(self) -> bool:
        """In an outage (the last call failed to reach Redis)."""
        return self._down

    def health(self) -> StoreHealth:
        """The outage state; probes Redis (one PING) once the backoff has passed."""
        if self._down and time.monotonic() >= self._down_until:
            try:
                self.call(self.client.ping)
            except StoreError:
                pass
        down = self._down
        return StoreHealth(available=not down,
                           error=self.last_error if down else None)

    def call(self, fn: Callable, *args, **kw):
        """``fn(*args, **kw)``; Redis errors become ``StoreUnavailable``/``StoreError``."""
        if self._down and time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis {redacted(self.url)} unavailable "
                                   f"({self.last_error}); retrying in "
                                   f"{self._down_until - time.monotonic():.1f}s")
        try:
            result = fn(*args, **kw)
        except OUTAGE_ERRORS as exc:
            self._failed(exc)
            raise StoreUnavailable(f"redis {redacted(self.url)} unreachable: "
                                   f"{type(exc).__name__}: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # OOM, script or type errors: Redis answered
            raise StoreError(f"redis {redacted(self.url)}: {type(exc).__name__}: {exc}") from exc
        if self._down:
            with self._health:
                if self._down:
                    self._down = False
                    self._backoff = self.BACKOFF_START_S
                    log.info("redis_reachable", url=redacted(self.url))
        return result

    def _failed(self, exc: BaseException) -> None:
        with self._health:
            self.last_error = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if not self._down:
                self._down = True
                self._backoff = self.BACKOFF_START_S
            elif now < self._down_until:
                return  # another thread's failure already set this window
            else:
                self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
            self._down_until = now + self._backoff

    def close(self) -> None:
        self.client.close()


def redacted(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
