"""The claim policy: which locks keep an inbox file to exactly one owner.

A claim is the lock backend's lock on ``claim:<inbox>/<relative path>`` and an
``O_EXCL`` claim file in the outbox's claims folder (``<outbox>/.rembgd-claims``,
on the share beside the outputs). The claim file is what every owner of a
source's fate sees, whatever its cache: daemons with a Redis cache (while Redis
is unreachable for some of them), daemons each with its own SQLite cache (whose
flocks are local to their cache folders), other machines, and a reviewer's
Approve (``daemon.verdict``). When the lock backend cannot answer, the claim
file alone is used (a fallback, logged).

``claim_source`` is the one way to claim a ``daemon.source.Source``: a job
holds it from before it reads the source until its fate is applied; Approve
and Redo hold it while they decide.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import structlog

from daemon.cache.base import StoreError, describe
from daemon.coord.leases import LeaseKeeper, Leases, try_lease
from daemon.coord.locks import FileClaims, LockBackend
from daemon.source import Source

log = structlog.get_logger("rembgd.claims")

CLAIMS_DIR = ".rembgd-claims"  # in the outbox
DEFAULT_TTL_S = 30.0


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
    if locks is not None:
        try:
            lease = try_lease(locks, name, ttl, keeper)
        except StoreError as exc:
            log.warning("claim_store_unavailable", error=describe(exc),
                        effect="claim files in the outbox keep each file to one daemon")
            if on_fallback is not None:
                on_fallback(exc)
        else:
            if lease is None:
                return None  # another daemon holds the lock
    file_lease = None
    try:
        file_lease = try_lease(FileClaims(claims_dir), name, ttl, keeper)
    finally:
        if file_lease is None and lease is not None:
            lease.release()  # claimed elsewhere, or the claim file failed (OSError)
    return Leases(lease, file_lease) if file_lease is not None else None


def claims_dir(outbox: Path) -> Path:
    return Path(outbox) / CLAIMS_DIR


def claim_source(locks: LockBackend | None, source: Source, ttl: float = DEFAULT_TTL_S, *,
                 on_fallback: Callable[[StoreError], None] | None = None) -> Leases | None:
    """Claim ``source``'s fate (see ``claim``); None when another owner has it."""
    return claim(locks, claims_dir(source.outbox), claim_name(source.inbox.name, source.rel),
                 ttl, on_fallback=on_fallback)
