"""Named, non-blocking locks with a TTL: the ``LockBackend`` Protocol and its three backends.

* ``FlockLocks``: ``flock`` on files in the cache folder; one machine (SQLite cache).
* ``RedisLocks``: ``SET NX PX`` on the shared Redis; several machines.
* ``FileClaims``: ``O_EXCL`` claim files on the shared file system; several machines
  (the fallback when the lock backend is down, and the second half of a claim).

Locks are kept apart from the cache's ``Store``: a lock never needs the index,
so a damaged or unavailable index does not stop the daemons from coordinating.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from daemon.cache.base import StoreUnavailable

if TYPE_CHECKING:
    from daemon.cache.redis_link import RedisLink
    from daemon.config import StoreConfig


class LockBackend(Protocol):
    """Named locks, each held by at most one holder (a token) at a time.

    TTL contract: a holder keeps a lock by calling ``refresh_lock`` well within
    ``ttl`` (``daemon.coord.leases`` does it at ttl/3). A lock whose holder
    stops renewing lapses after ``ttl`` at the latest, so that a crashed or
    cut-off holder never blocks the others for good. Backends may release
    earlier, never later: ``FlockLocks`` ignores the TTL because the kernel
    drops a flock the moment its holder process dies, which is stronger
    (a live holder that stops renewing keeps an flock until ``unlock``).
    Each backend's lapse semantics are tested on their own.

    Errors: ``StoreError`` (usually ``StoreUnavailable``) when the backend
    cannot answer; never for "someone else holds it" (``try_lock`` -> None) or a
    lost lock (``refresh_lock`` -> False). Names are free-form text.
    """

    shared_across_hosts: bool  # True: holders on other machines see the same locks

    def try_lock(self, name: str, ttl: float) -> str | None:
        """Non-blocking; a token when acquired, None when someone else holds it."""

    def refresh_lock(self, name: str, token: str, ttl: float) -> bool:
        """Extend the lock to ``ttl`` from now; False when ``token`` no longer holds it."""

    def unlock(self, name: str, token: str) -> None:
        """Release; a token that no longer holds the lock releases nothing."""

    def close(self) -> None:
        """Release what this object holds (locks, a connection of its own); never raises."""


def _hashed(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


# ------------------------------------------------------------------ flock


class FlockLocks:
    """``flock`` on ``<folder>/<sha1(name)>.lock``: one machine, any number of processes.

    The kernel drops a lock when its holder dies (kill -9 included), so the TTL
    is not needed and is ignored. ``flock`` does not work across NFS/SMB clients:
    never use this for an inbox watched from several machines.
    """

    shared_across_hosts = False

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._held: dict[str, tuple[str, int]] = {}
        self._mutex = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.folder / (_hashed(name) + ".lock")

    def try_lock(self, name: str, ttl: float) -> str | None:
        with self._mutex:
            if name in self._held:  # flock is per open file: this process would get it again
                return None
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # read-only or missing cache folder
                raise StoreUnavailable(f"cannot create lock file in {self.folder}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                raise StoreUnavailable(f"flock failed in {self.folder}: {exc}") from exc
            token = uuid.uuid4().hex
            self._held[name] = (token, fd)
            return token

    def refresh_lock(self, name: str, token: str, ttl: float) -> bool:
        with self._mutex:
            held = self._held.get(name)
        return held is not None and held[0] == token  # no expiry to extend

    def unlock(self, name: str, token: str) -> None:
        with self._mutex:
            held = self._held.get(name)
            if held is None or held[0] != token:
                return
            del self._held[name]
        os.close(held[1])  # closing drops the flock

    def close(self) -> None:
        """Release every lock this object holds."""
        with self._mutex:
            held, self._held = list(self._held.values()), {}
        for _, fd in held:
            os.close(fd)


# ------------------------------------------------------------------ Redis

_LUA_REFRESH = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_LUA_UNLOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLocks:
    """``SET key token NX PX ttl``; refresh and unlock compare the token in Lua.

    Keys: ``{prefix}:v1:lock:{name}`` (the cache's key space). Goes through a
    ``RedisLink``, normally the cache store's, so an outage is one outage
    (one breaker, one backoff) for the cache and its locks. A lapsed lock is
    gone: its old holder can neither refresh it nor release the next holder's.
    ``owns_link``: ``close`` closes the link too (it is no one else's).
    """

    shared_across_hosts = True

    def __init__(self, link: RedisLink, key_prefix: str, *, owns_link: bool = False):
        self.link = link
        self._owns_link = owns_link
        self.key_prefix = key_prefix  # e.g. "rembgd:v1:"
        self._refresh = link.client.register_script(_LUA_REFRESH)
        self._unlock = link.client.register_script(_LUA_UNLOCK)

    def _key(self, name: str) -> str:
        return f"{self.key_prefix}lock:{name}"

    def try_lock(self, name: str, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        ok = self.link.call(self.link.client.set, self._key(name), token, nx=True,
                            px=max(1, int(ttl * 1000)))
        return token if ok else None

    def refresh_lock(self, name: str, token: str, ttl: float) -> bool:
        return bool(self.link.call(self._refresh, keys=[self._key(name)],
                                   args=[token, max(1, int(ttl * 1000))]))

    def unlock(self, name: str, token: str) -> None:
        self.link.call(self._unlock, keys=[self._key(name)], args=[token])

    def close(self) -> None:
        """Held locks lapse by their TTL; a connection of its own is closed."""
        if self._owns_link:
            self.link.close()


# ------------------------------------------------------------ claim files


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
    """Claims as files on the shared file system: ``<folder>/<sha1(name)>.claim``.

    ``O_CREAT | O_EXCL`` is atomic on local disks, NFSv3+ and SMB. A claim whose
    file has not been touched (refreshed) for ``ttl`` seconds, or whose owner is
    a dead process on this host, is broken by the next ``try_lock``.

    Unlike the other backends, a claim file that cannot be written raises the
    ``OSError`` itself (full or read-only outbox): the caller retries the file.
    """

    shared_across_hosts = True

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        """The claim file of ``name``."""
        return self.folder / (_hashed(name) + ".claim")

    def try_lock(self, name: str, ttl: float) -> str | None:
        # never parents: a vanished outbox (a lost mount) must not be re-created locally
        self.folder.mkdir(exist_ok=True)
        path = self.path(name)
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
        path = self.path(name)
        try:
            if path.read_text() != token:
                return False
            os.utime(path)
            return True
        except OSError:
            return False

    def unlock(self, name: str, token: str) -> None:
        path = self.path(name)
        try:
            if path.read_text() == token:
                path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        """Nothing to release: each claim is released by its lease."""


# ---------------------------------------------------------------- factory


def open_locks(store_cfg: StoreConfig, cache_dir: Path,
               link: RedisLink | None = None) -> LockBackend:
    """The lock backend that goes with the configured cache backend.

    SQLite: ``FlockLocks(cache_dir / "locks")``. Redis: ``RedisLocks`` on ``link``
    (the store's connection: one outage for both; it stays the caller's to close),
    else on a connection of its own. Never contacts Redis here, so it works
    during an outage.
    """
    if store_cfg.backend == "redis":
        from daemon.cache.redis import SCHEMA_VERSION, RedisLink

        prefix = f"{store_cfg.prefix}:v{SCHEMA_VERSION}:"
        if link is not None:
            return RedisLocks(link, prefix)
        return RedisLocks(RedisLink(store_cfg), prefix, owns_link=True)
    return FlockLocks(Path(cache_dir) / "locks")
