"""The one owner of "is the cache down": ``CacheGuard``.

The guard holds the opened store (or None), opens it, and re-opens it when it
is unusable: every ``store.retry_s`` while it cannot be opened, and at once
(at most once a second) when the store reports a damaged index, which the
re-open heals. ``call`` runs a store operation and degrades to a default on
``StoreError`` only; any other exception is a bug and propagates.

Logging, once per outage: ``cache_unavailable`` (error, with the effect) on the
first failure; ``cache_recovered`` once ``store.retry_s`` has passed without a
failure (when reads work and writes fail, e.g. a read-only cache folder, the
log would otherwise flip on every file), or as soon as a re-open succeeds.
``status()`` is what the status file shows. The state itself is the guard's
``Outage`` (``daemon.cache.outage``), which a Redis connection shares.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

import structlog

from daemon.cache.base import Store, StoreDamaged, StoreError, describe
from daemon.cache.outage import Outage
from daemon.config import CacheConfig, StoreConfig

log = structlog.get_logger("rembgd.cache")

T = TypeVar("T")

DAMAGED_REOPEN_S = 1.0  # a damaged store is re-opened at once, at most this often


class CacheGuard:
    """Opens, watches and re-opens the configured store; thread-safe.

    ``opener``: a callable returning a fresh store, instead of ``open_store``
    (``daemon.service.app.open_cache`` shares one Redis connection this way).
    Built only for an enabled cache; the lock backend is not the guard's.
    ``outage``: the record of the cache's outages, when the store's connection
    already records into it (Redis); else a fresh one.
    """

    def __init__(self, store_cfg: StoreConfig, cache_cfg: CacheConfig, *,
                 opener: Callable[[], Store] | None = None, outage: Outage | None = None):
        from daemon.cache import open_store

        self.store_cfg, self.cache_cfg = store_cfg, cache_cfg
        self._opener = opener or (lambda: open_store(store_cfg, cache_cfg))
        self._state = threading.Lock()  # guards store_errors and the damage flag
        self._opening = threading.Lock()  # one (re-)open at a time; others do not wait
        self._store: Store | None = None
        self.store_errors = 0  # failed store operations
        self.outage = outage if outage is not None else Outage()
        self._opened_at = float("-inf")  # last open attempt
        self._healed_at = float("-inf")  # last re-open because of damage
        self._damaged = False
        self._open()

    # ------------------------------------------------------------ public

    @property
    def store(self) -> Store | None:
        """The open store (None: not open right now); re-opens it first when that is due."""
        return self._usable()

    @property
    def available(self) -> bool:
        return self.status()["available"]

    def call(self, fn: Callable[..., T], *args: Any, default: Any = None) -> T:
        """``fn(store, *args)``, or ``default`` when the cache is unavailable or fails.

        Only ``StoreError`` is caught (and counted, and logged once per outage).
        """
        store = self._usable()
        if store is None:
            return default
        try:
            result = fn(store, *args)
        except StoreError as exc:
            self._failed(exc, store)
            return default
        self._maybe_recovered()
        return result

    def failed(self, exc: StoreError) -> None:
        """Record a failure of a related backend call made outside ``call`` (a lock, a
        claim): one outage, logged once, whichever call saw it."""
        self._failed(exc, self._store)

    def status(self) -> dict:
        """For the status file: backend, available, error, store_errors, outages.

        Cheap: ``store.health()`` (no scan); notices a damaged index and re-opens it.
        """
        store = self._usable()
        health = store.health() if store is not None else None
        if health is not None and not health.available:
            self._unhealthy(store, health.error or "unavailable", health.damaged)
            if health.damaged:
                store = self._usable()  # heal now
                health = store.health() if store is not None else None
        elif health is not None:
            self._maybe_recovered()
        available = (store is not None and health is not None and health.available
                     and not self.outage.down)
        return {
            "backend": self.store_cfg.backend,
            "available": available,
            "error": None if available else (self.outage.error
                                             or (health.error if health else None)),
            "store_errors": self.store_errors,
            "outages": self.outage.count,
        }

    def close(self) -> None:
        with self._opening:
            store, self._store = self._store, None
            if store is not None:
                store.close()

    # ----------------------------------------------------------- opening

    def _usable(self) -> Store | None:
        store = self._store
        now = time.monotonic()
        if self._damaged and now - self._healed_at >= DAMAGED_REOPEN_S:
            self._healed_at = now
            self._open()
            store = self._store
        elif store is None and not self._damaged and now - self._opened_at >= self.store_cfg.retry_s:
            self._open()
            store = self._store
        return None if self._damaged else store

    def _open(self) -> None:
        if not self._opening.acquire(blocking=False):
            return  # another thread is opening: this call goes without the cache
        try:
            self._opened_at = time.monotonic()
            old, self._store = self._store, None
            self._damaged = False  # the damaged store goes; a failed open waits retry_s
            if old is not None:
                old.close()
            try:
                store = self._opener()
            except StoreError as exc:
                self._note_down(describe(exc), count=False)
                return
            with self._state:
                self._store, self._damaged = store, False
            if self.outage.clear():
                log.warning("cache_recovered", backend=self.store_cfg.backend)
        finally:
            self._opening.release()

    # ---------------------------------------------------------- failures

    def _failed(self, exc: StoreError, store: Store | None) -> None:
        if store is not self._store:
            return  # the store was replaced (re-opened) meanwhile: old news
        with self._state:
            self._damaged |= isinstance(exc, StoreDamaged)
        self._note_down(describe(exc), count=True)

    def _unhealthy(self, store: Store, error: str, damaged: bool) -> None:
        if store is not self._store:
            return
        with self._state:
            self._damaged |= damaged
        self._note_down(error, count=False)

    def _note_down(self, error: str, count: bool) -> None:
        with self._state:
            self.store_errors += count
            damaged = self._damaged
        if self.outage.note(error):
            retry = ("the damaged index is set aside and a fresh one started" if damaged
                     else f"retrying every {self.store_cfg.retry_s:g}s")
            log.error("cache_unavailable", backend=self.store_cfg.backend, error=error,
                      effect=f"processing continues without the cache; {retry}")

    def _maybe_recovered(self) -> None:
        if not self.outage.down or self._store is None or self._damaged:
            return
        if self.outage.quiet(self.store_cfg.retry_s):
            log.warning("cache_recovered", backend=self.store_cfg.backend)
