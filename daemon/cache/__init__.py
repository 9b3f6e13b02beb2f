"""Storage backends behind one Protocol (``base.Store``)."""
from __future__ import annotations

from daemon.config import Config
from daemon.cache.base import Entry, Store, StoreUnavailable

__all__ = ["Entry", "Store", "StoreUnavailable", "open_store"]


def open_store(cfg: Config) -> Store:
    """The configured backend. Raises on a broken cache; callers decide how to degrade."""
    if cfg.store.backend == "redis":
        from daemon.cache.redis import RedisStore

        return RedisStore(cfg)
    from daemon.cache.sqlite import SqliteStore

    return SqliteStore(cfg.cache.dir)
