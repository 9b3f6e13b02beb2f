"""Storage backends behind one Protocol (``base.Store``); ``guard.CacheGuard`` watches them
and ``mask_cache.MaskCache`` reads and writes masks through the guard."""
from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.cache.base import (Entry, Store, StoreDamaged, StoreError, StoreHealth,
                               StoreUnavailable)
from daemon.config import CacheConfig, StoreConfig

if TYPE_CHECKING:
    from daemon.cache.redis_link import RedisLink

__all__ = ["Entry", "Store", "StoreDamaged", "StoreError", "StoreHealth", "StoreUnavailable",
           "open_store"]


def open_store(store: StoreConfig, cache: CacheConfig, *, heal: bool = True,
               link: RedisLink | None = None) -> Store:
    """The configured backend; raises ``StoreError`` when it cannot be opened.

    SQLite: a damaged index is set aside and a fresh one started (``heal=False``:
    raise ``StoreDamaged`` instead). Redis: never raises for an outage; the
    store starts unavailable (see its ``health()``) and recovers by itself.
    ``link``: the Redis connection to use (it stays the caller's to close).
    """
    if store.backend == "redis":
        from daemon.cache.redis import RedisStore

        return RedisStore(store, cache, link=link)
    from daemon.cache.sqlite import SqliteStore

    return SqliteStore(cache.dir, heal=heal)
