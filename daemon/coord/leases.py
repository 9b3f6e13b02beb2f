"""Leases over a store's locks: acquire, keep extending while working, release."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from daemon.cache.base import Store


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


class Leases:
    """Several leases held and released together."""

    def __init__(self, *leases: Lease | None):
        self.leases = [lease for lease in leases if lease is not None]

    def release(self) -> None:
        for lease in reversed(self.leases):
            lease.release()


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


def _owner_is_dead(token: str) -> bool:
    """A claim made on this host by a process that no longer exists (kill -9, crash)."""
    host, _, rest = token.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class FileClaims:
    """Claims as files on the shared file system: the fallback when the store is down.

    ``O_CREAT | O_EXCL`` is atomic on local disks, NFSv3+ and SMB. A claim whose
    file has not been touched for ``ttl`` seconds was left by a dead daemon and
    may be broken. Implements the lock part of the Store Protocol.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, name: str) -> Path:
        return self.folder / (hashlib.sha1(name.encode()).hexdigest() + ".claim")

    def try_lock(self, name: str, ttl: float) -> str | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    stale = (time.time() - path.stat().st_mtime > ttl
                             or _owner_is_dead(path.read_text(errors="replace")))
                except FileNotFoundError:
                    continue
                if not stale:
                    return None
                try:
                    path.unlink()  # a dead daemon's claim
                except FileNotFoundError:
                    pass
                continue
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(token)
            except OSError:  # e.g. a full disk: leave no empty claim behind
                try:
                    path.unlink()
                except OSError:
                    pass
                raise
            return token
        return None

    def refresh_lock(self, name: str, token: str, ttl: float) -> bool:
        path = self._path(name)
        try:
            if path.read_text() != token:
                return False
            os.utime(path)
            return True
        except OSError:
            return False

    def unlock(self, name: str, token: str) -> None:
        path = self._path(name)
        try:
            if path.read_text() == token:
                path.unlink()
        except OSError:
            pass
