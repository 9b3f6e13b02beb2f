"""Single flight: one inference per image at a time, in this process and across daemons.

The first caller of a key computes; callers of the same key in this process
wait on its event, other daemons wait for its lease on the lock backend. A
waiter asks ``recheck`` first (the winner has usually stored the result) and
computes only if that finds nothing. Best effort: a lock backend that cannot
answer only costs a duplicate inference (the failure goes to ``on_error``).
"""
from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, TypeVar

from daemon.cache.base import StoreError
from daemon.coord.leases import try_lease, waiting_lease
from daemon.coord.locks import LockBackend

T = TypeVar("T")

FLIGHT_TIMEOUT_S = 600.0


class SingleFlight:
    def __init__(self, locks: LockBackend | None, ttl_s: float,
                 on_error: Callable[[StoreError], None], *, timeout_s: float = FLIGHT_TIMEOUT_S):
        self.locks = locks
        self.ttl_s = ttl_s
        self.on_error = on_error
        self.timeout_s = timeout_s
        self._inflight: dict[str, threading.Event] = {}
        self._mutex = threading.Lock()

    def run(self, key: str, recheck: Callable[[], T | None], compute: Callable[[], T]) -> T:
        """``compute()`` unless a wait for another holder of ``key`` ends with ``recheck()``
        finding the result."""
        with self._mutex:
            event = self._inflight.get(key)
            leader = event is None
            if leader:
                self._inflight[key] = event = threading.Event()
        try:
            if not leader:
                event.wait(timeout=self.timeout_s)
                found = recheck()
                if found is not None:
                    return found
            with self._lease(key) as waited:
                if waited:
                    found = recheck()
                    if found is not None:
                        return found
                return compute()
        finally:
            if leader:
                with self._mutex:
                    self._inflight.pop(key, None)
                event.set()

    @contextmanager
    def _lease(self, key: str) -> Iterator[bool]:
        """Yields whether another process held the key (then ``recheck`` is due)."""
        waited = False
        with ExitStack() as stack:
            if self.locks is not None:
                name = f"flight:{key}"
                try:
                    lease = try_lease(self.locks, name, self.ttl_s)
                    if lease is not None:
                        stack.callback(lease.release)
                    else:
                        waited = True
                        stack.enter_context(waiting_lease(self.locks, name, self.ttl_s,
                                                          timeout=self.timeout_s))
                except StoreError as exc:
                    self.on_error(exc)
            yield waited
