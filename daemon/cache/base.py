"""The storage Protocol every backend implements, the values it trades in, and its errors.

Error contract: a backend raises ``StoreError`` (or a subclass) for trouble in
the backend itself (I/O errors, a damaged index, ``sqlite3.Error``, a failed or
unreachable Redis) and nothing else; the original exception is its
``__cause__``. Anything else that escapes a backend (``TypeError``,
``KeyError``...) is a bug and must not be mistaken for "cache unavailable".
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator, Protocol

import numpy as np

from daemon.imaging.fingerprint import Fingerprint, Thumbs

class Tier(enum.StrEnum):
    """Where a mask came from: a lookup's tier (a ``str``: logs and JSON show the value)."""

    EXACT = "exact"  # the same file
    PIXEL = "pixel"  # the same pixels
    NEAR = "near"  # a near-duplicate's mask, re-aligned
    MISS = "miss"  # inferred

    @property
    def is_hit(self) -> bool:
        return self is not Tier.MISS

    @classmethod
    def named(cls, value: str) -> Tier | None:
        """The tier ``value`` names, or None where it names none."""
        try:
            return cls(value)
        except ValueError:
            return None


@dataclass(frozen=True)
class Entry:
    """One cached result: fingerprints, the mask blob and (optionally) the output blob."""

    id: str
    key: str
    model: str
    fp: Fingerprint
    mask_digest: str
    output_digest: str | None
    nbytes: int  # mask + output blob sizes
    created: float
    last_hit: float
    hits: int
    origin: str | None = None  # None: inferred here; else the entry whose mask it reuses


class HitBuffer:
    """Lookup records coalesced in memory until a store flushes them.

    Per entry: (last hit time, hits); per (hour, tier): a count. Not thread-safe:
    the owning store holds its own lock around every call.
    """

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self.hits: dict[str, tuple[float, int]] = {}
        self.tiers: dict[tuple[int, str], int] = {}
        self._taken_at = time.monotonic()

    def due(self, every_s: float) -> bool:
        """More than ``every_s`` since the last flush took the buffer."""
        return time.monotonic() - self._taken_at > every_s

    def add(self, entry_id: str | None, tier: str, now: float) -> None:
        tier = Tier(tier)
        key = (int(now // 3600), tier)
        self.tiers[key] = self.tiers.get(key, 0) + 1
        if entry_id is not None and tier.is_hit:
            self._merge_hit(entry_id, now, 1)

    def _merge_hit(self, entry_id: str, when: float, n: int) -> None:
        if entry_id not in self.hits and len(self.hits) >= self.max_entries:
            return  # bounded: losing a hit count only ages an entry a little sooner
        t0, n0 = self.hits.get(entry_id, (when, 0))
        self.hits[entry_id] = (max(when, t0), n0 + n)

    def take(self) -> tuple[dict[str, tuple[float, int]], dict[tuple[int, str], int]]:
        hits, tiers = self.hits, self.tiers
        self.hits, self.tiers = {}, {}
        self._taken_at = time.monotonic()
        return hits, tiers

    def merge_back(self, hits: dict, tiers: dict) -> None:
        """Put back what a failed flush took, for the next flush."""
        for entry_id, (when, n) in hits.items():
            self._merge_hit(entry_id, when, n)
        for key, n in tiers.items():
            self.tiers[key] = self.tiers.get(key, 0) + n


class StoreError(RuntimeError):
    """The backend failed (I/O, damaged index, database or Redis error); never a bug."""


class StoreUnavailable(StoreError):
    """The backend cannot be used right now (outage, locked, read-only, full); retry later."""


class StoreDamaged(StoreError):
    """The backend's index is damaged; re-opening the store sets it aside and starts afresh."""


@dataclass(frozen=True)
class StoreHealth:
    """What a store knows about itself, cheaply (no full scan).

    ``damaged``: the index is damaged and only re-opening the store heals it
    (``available`` is then False too).
    """

    available: bool
    error: str | None = None
    damaged: bool = False


class Store(Protocol):
    """Index + blobs. Reads that find nothing usable return None, never raise.

    Every method may raise ``StoreError`` (see the module docstring). Locks are
    not part of a store: see ``daemon.coord.locks``.
    """

    name: ClassVar[str]  # "sqlite" | "redis"

    def health(self) -> StoreHealth:
        """Cheap (no network round trip while healthy, no full scan); never raises."""

    def find_exact(self, key: str, sha256: str) -> Entry | None: ...

    def find_pixel(self, key: str, pixel_hash: str) -> Entry | None: ...

    def find_near(self, key: str, phash: bytes, radius: int) -> list[Entry]:
        """Inferred (non-alias) entries within ``radius`` Hamming bits, nearest first."""

    def get_blob(self, digest: str) -> bytes | None:
        """Blob bytes after a checksum check; None when missing or corrupt."""

    def put(self, key: str, model: str, fp: Fingerprint, mask_png: bytes,
            output_png: bytes | None, origin: str | None = None) -> Entry:
        """Write blobs first, then the row, so a crash never leaves a dangling row."""

    def record(self, entry_id: str | None, tier: str) -> None:
        """Count a lookup outcome; hit metadata updates are coalesced."""

    def flush(self) -> None: ...

    def delete(self, ids: list[str]) -> int: ...

    def entries(self) -> Iterator[Entry]: ...

    def tier_counts(self, since: float) -> dict[str, int]: ...

    def total_bytes(self) -> int: ...

    def count(self) -> int: ...

    # blob maintenance (cache verify / export / import)
    def put_blob(self, data: bytes) -> str: ...

    def blob_digests(self) -> Iterator[str]: ...

    def delete_blob(self, digest: str) -> None: ...

    def restore(self, entry: Entry) -> None:
        """Insert ``entry`` as-is (id, times, hits); its blobs must already be stored."""

    def restore_many(self, entries: list[Entry], blobs: Iterable[bytes] = ()) -> None:
        """``blobs`` first, then every entry as ``restore`` would, in one batch."""

    def close(self) -> None:
        """Flush what can be flushed and release the backend; never raises ``StoreError``."""


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error, and of its cause when it wraps one."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause) not in str(exc):
        text += f" ({type(cause).__name__}: {cause})"
    return text


def embedding_bytes(vec: np.ndarray | None) -> bytes:
    return b"" if vec is None else np.asarray(vec, np.float16).tobytes()


def embedding_from(raw: bytes | None) -> np.ndarray | None:
    if not raw:
        return None
    return np.frombuffer(raw, np.float16).astype(np.float32)


def fingerprint_from(sha256: str, pixel_hash: str, phash: bytes, width: int, height: int,
                     thumbs: bytes, embedding: bytes | None) -> Fingerprint:
    return Fingerprint(sha256=sha256, pixel_hash=pixel_hash, phash=bytes(phash), width=width,
                       height=height, thumbs=Thumbs.from_bytes(bytes(thumbs)),
                       embedding=embedding_from(embedding))
