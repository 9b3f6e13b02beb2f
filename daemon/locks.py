"""Leases over a store's locks: acquire, keep extending while working, release."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .store.base import Store


class Lease:
    """A held lock whose TTL a background thread keeps extending."""

    def __init__(self, store: Store, name: str, token: str, ttl: float):
        self.store, self.name, self.token, self.ttl = store, name, token, ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease:{name[:24]}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.store.refresh_lock(self.name, self.token, self.ttl):
                    self.lost.set()
                    return
            except Exception:  # store unreachable: keep trying until the TTL would lapse
                continue

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        try:
            self.store.unlock(self.name, self.token)
        except Exception:
            pass  # an unreachable store expires the lock by itself


def try_lease(store: Store, name: str, ttl: float) -> Lease | None:
    token = store.try_lock(name, ttl)
    return Lease(store, name, token, ttl) if token else None


@contextmanager
def waiting_lease(store: Store, name: str, ttl: float, timeout: float,
                  poll: float = 0.05) -> Iterator[Lease | None]:
    """Block (polling) until the lock is ours; yields None if ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    lease = try_lease(store, name, ttl)
    while lease is None and time.monotonic() < deadline:
        time.sleep(poll)
        poll = min(poll * 1.5, 0.5)
        lease = try_lease(store, name, ttl)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
