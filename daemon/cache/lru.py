"""A small thread-safe LRU bounded by item count and, optionally, total size.

Owns nothing but the eviction order: the shared store's local tier
(``daemon.cache.redis``) uses it for blobs by digest, entries by id and index
hints. An item larger than an eighth of ``max_size`` is not kept at all.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class LRU:
    """A small thread-safe LRU, bounded by item count and (optionally) total size."""

    def __init__(self, max_items: int, max_size: int | None = None):
        self.max_items, self.max_size = max_items, max_size
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, k: Any) -> Any:
        with self._lock:
            item = self._data.get(k)
            if item is None:
                return None
            self._data.move_to_end(k)
            return item[0]

    def put(self, k: Any, v: Any, size: int = 0) -> None:
        if self.max_items <= 0 or (self.max_size is not None and size > self.max_size // 8):
            return
        with self._lock:
            old = self._data.pop(k, None)
            if old is not None:
                self._size -= old[1]
            self._data[k] = (v, size)
            self._size += size
            while self._data and (len(self._data) > self.max_items or
                                  (self.max_size is not None and self._size > self.max_size)):
                _, (_, s) = self._data.popitem(last=False)
                self._size -= s

    def pop(self, k: Any) -> None:
        with self._lock:
            old = self._data.pop(k, None)
            if old is not None:
                self._size -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0
