"""The claim policy: which locks keep an inbox file to exactly one daemon.

A claim is the lock backend's lock on ``claim:<inbox>/<relative path>`` and,
where daemons on several machines may watch the same inbox (a lock backend
shared across hosts, i.e. Redis), an ``O_EXCL`` claim file in the outbox's
claims folder as well: while Redis is unreachable for some daemons and not for
others, the claim file still keeps each file to one of them. When the lock
backend cannot answer, the claim file alone is used (a fallback, logged).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import structlog

from daemon.cache.base import StoreError, describe
from daemon.coord.leases import LeaseKeeper, Leases, try_lease
from daemon.coord.locks import FileClaims, LockBackend

log = structlog.get_logger("rembgd.claims")


def claim_name(inbox_name: str, rel: Path) -> str:
    """The lock name of an inbox file; a name that is not valid UTF-8 still makes a key."""
    name = f"claim:{inbox_name}/{rel.as_posix()}"
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def claim(locks: LockBackend | None, claims_dir: Path, name: str, ttl: float, *,
          on_fallback: Callable[[StoreError], None] | None = None,
          keeper: LeaseKeeper | None = None) -> Leases | None:
    """Claim ``name`` for this daemon; None when another daemon has it.

    ``locks`` None (no cache): the claim file alone. Raises ``OSError`` when the
    claim file cannot be written (full or read-only outbox): nothing is left
    held, and the caller retries the file later. ``on_fallback`` is called
    (e.g. to count it) when the lock backend failed and the claim file stands in.
    """
    lease = None
    shared = locks is None or locks.shared_across_hosts
    if locks is not None:
        try:
            lease = try_lease(locks, name, ttl, keeper)
        except StoreError as exc:
            log.warning("claim_store_unavailable", error=describe(exc),
                        effect="claim files in the outbox keep each file to one daemon")
            if on_fallback is not None:
                on_fallback(exc)
            shared = True
        else:
            if lease is None:
                return None  # another daemon holds the lock
    if not shared:
        return Leases(lease)  # one machine: the lock backend's lock is enough
    file_lease = None
    try:
        file_lease = try_lease(FileClaims(claims_dir), name, ttl, keeper)
    finally:
        if file_lease is None and lease is not None:
            lease.release()  # claimed elsewhere, or the claim file failed (OSError)
    return Leases(lease, file_lease) if file_lease is not None else None
