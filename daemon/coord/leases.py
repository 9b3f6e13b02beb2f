"""Leases over a ``LockBackend``: acquire, keep extending while working, release.

One ``LeaseKeeper`` thread per process renews every live lease (each at
ttl/3), however many leases there are: a miss that holds a flight lock and a
claim costs no thread of its own.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import structlog

from daemon.cache.base import StoreError, describe
from daemon.coord.locks import LockBackend

log = structlog.get_logger("rembgd.leases")


class Lease:
    """A held lock that the keeper keeps extending until ``release()``.

    ``lost`` is set when the lock is known to be gone: the backend refused the
    refresh (someone else holds it now), or refreshing failed for longer than
    ``ttl`` (the lock has lapsed). A lost lease is no longer renewed.
    """

    def __init__(self, locks: LockBackend, name: str, token: str, ttl: float,
                 keeper: LeaseKeeper | None = None):
        self.locks, self.name, self.token, self.ttl = locks, name, token, ttl
        self.lost = threading.Event()
        self._keeper = keeper if keeper is not None else default_keeper()
        self._renewed_at = time.monotonic()  # last successful refresh (or the acquisition)
        self.due = self._renewed_at + ttl / 3
        self._released = False
        self._keeper.add(self)

    def renew(self) -> None:
        """One refresh; called by the keeper thread."""
        if self._released:
            return
        now = time.monotonic()
        try:
            ok = self.locks.refresh_lock(self.name, self.token, self.ttl)
        except StoreError as exc:  # backend unreachable: keep trying until the TTL would lapse
            if now - self._renewed_at > self.ttl:
                log.warning("lease_lost", lock=self.name, error=describe(exc),
                            effect="the lock has lapsed; another daemon may take it")
                self.lost.set()
            self.due = now + min(self.ttl / 3, 1.0)
            return
        if not ok:
            if self._released:
                return  # released while refreshing: not lost, just gone
            log.warning("lease_lost", lock=self.name, effect="another holder has the lock now")
            self.lost.set()
            return
        self._renewed_at = now
        self.due = now + self.ttl / 3

    def release(self) -> None:
        """Stop renewing and unlock; idempotent. An unreachable backend lets the lock lapse."""
        if self._released:
            return
        self._released = True
        self._keeper.remove(self)
        try:
            self.locks.unlock(self.name, self.token)
        except StoreError:
            pass  # the TTL releases it


class Leases:
    """Several leases held and released together (last acquired, first released)."""

    def __init__(self, *leases: Lease | None):
        self.leases = [lease for lease in leases if lease is not None]

    @property
    def lost(self) -> bool:
        return any(lease.lost.is_set() for lease in self.leases)

    def release(self) -> None:
        for lease in reversed(self.leases):
            lease.release()


class LeaseKeeper:
    """One daemon thread renewing every live lease when it falls due.

    The thread starts with the first lease and ends when the last one is
    released. Refreshes run one after another; a Redis outage costs one
    socket timeout, then its breaker fails the others fast.
    """

    THREAD_NAME = "lease-keeper"

    def __init__(self):
        self._cond = threading.Condition()
        self._leases: dict[int, Lease] = {}
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._leases[id(lease)] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME,
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._leases.pop(id(lease), None)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._leases:
                    self._thread = None  # add() starts a new one
                    return
                now = time.monotonic()
                wake = min(lease.due for lease in self._leases.values())
                if wake > now:
                    self._cond.wait(wake - now)
                    continue
                due = [lease for lease in self._leases.values() if lease.due <= now]
            for lease in due:  # outside the lock: a refresh may wait on the network
                try:
                    lease.renew()
                except Exception:  # a bug in one backend must not stop every renewal
                    log.exception("lease_renewal_failed", lock=lease.name)
                    lease.lost.set()
                if lease.lost.is_set():
                    self.remove(lease)


_DEFAULT: LeaseKeeper | None = None
_DEFAULT_LOCK = threading.Lock()


def default_keeper() -> LeaseKeeper:
    """The process's keeper, shared by every lease that is not given one."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = LeaseKeeper()
        return _DEFAULT


def try_lease(locks: LockBackend, name: str, ttl: float,
              keeper: LeaseKeeper | None = None) -> Lease | None:
    """A lease on ``name``, or None when someone else holds it; raises ``StoreError``."""
    token = locks.try_lock(name, ttl)
    return Lease(locks, name, token, ttl, keeper) if token else None


@contextmanager
def waiting_lease(locks: LockBackend, name: str, ttl: float, timeout: float,
                  poll: float = 0.05, keeper: LeaseKeeper | None = None
                  ) -> Iterator[Lease | None]:
    """Block (polling) until the lock is ours; yields None if ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    lease = try_lease(locks, name, ttl, keeper)
    while lease is None and time.monotonic() < deadline:
        time.sleep(poll)
        poll = min(poll * 1.5, 0.5)
        lease = try_lease(locks, name, ttl, keeper)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
