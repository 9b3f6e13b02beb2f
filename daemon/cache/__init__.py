"""Storage backends behind one Protocol (``base.Store``); ``guard.CacheGuard`` watches them."""
from __future__ import annotations

from daemon.cache.base import (Entry, Store, StoreDamaged, StoreError, StoreHealth,
                               StoreUnavailable)
from daemon.config import CacheConfig, StoreConfig

__all__ = ["Entry", "Store", "StoreDamaged", "StoreError", "StoreHealth", "StoreUnavailable",
           "open_store"]


def open_store(store: StoreConfig, cache: CacheConfig, *, heal: bool = True) -> Store:
    """The configured backend; raises ``StoreError`` when it cannot be opened.

    SQLite: a damaged index is set aside and a fresh one started (``heal=False``:
    raise ``StoreDamaged`` instead). Redis: never raises for an outage; the
    store starts unavailable (see its ``health()``) and recovers by itself.
    """
    if store.backend == "redis":
        from daemon.cache.redis import RedisStore

        return RedisStore(store, cache)
    from daemon.cache.sqlite import SqliteStore

    return SqliteStore(cache.dir, heal=heal)
