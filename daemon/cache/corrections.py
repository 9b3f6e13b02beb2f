"""Retouchers' corrections: a touched-up alpha kept in the cache for its source.

A correction is a full-size alpha (8-bit PNG) stored as an ordinary cache entry under
its own key, ``KEY``, whatever the model: the same bytes (``sha256``) or the same
decoded pixels (``pixel_hash``: a re-encode, other metadata) find it. The pipeline
asks here before anything else, so a correction wins over the model's mask, over
stored outputs and over a near-duplicate's mask; re-dropping the photo or adding a
deliverable later renders from it. ``drop`` (revert) removes it, and the model's mask
is used again. Every call goes through the guard: a failing store is a miss here too.

``Workbench`` keeps the one source a retoucher is touching up decoded in memory (its
pixels, fingerprint and current alpha) between touch-ups, so the next stroke costs
the stroke and the encode, not a decode, a fingerprint and a mask decode again. It is
checked against the store before use (the correction there must still be the one it
holds: a revert, or another daemon's touch-up over a shared cache, makes it stale) and
let go after ``ttl_s`` unused.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np

from daemon.cache.guard import CacheGuard
from daemon.imaging.fingerprint import Fingerprint

KEY = "touchup:1"  # every model's: a correction is the retoucher's, not a model's


class Corrections:
    def __init__(self, guard: CacheGuard):
        self.guard = guard

    def find(self, sha256: str, pixel_hash: str | None = None) -> bytes | None:
        """The corrected alpha (PNG) for these bytes, or these pixels; None if none."""
        found = self.current(sha256, pixel_hash)
        return found[1] if found is not None else None

    def current(self, sha256: str, pixel_hash: str | None = None
                ) -> tuple[str, bytes] | None:
        """(blob digest, corrected alpha PNG) for these bytes or pixels; None if none."""
        for hit in self._hits(sha256, pixel_hash):
            data = self.guard.call(lambda s: s.get_blob(hit.mask_digest))
            if data is not None:
                return hit.mask_digest, data
        return None

    def digest(self, sha256: str, pixel_hash: str | None = None) -> str | None:
        """The blob digest of the correction ``find`` would return (no blob read)."""
        return next((hit.mask_digest for hit in self._hits(sha256, pixel_hash)), None)

    def _hits(self, sha256: str, pixel_hash: str | None):
        finds = [lambda s: s.find_exact(KEY, sha256)]
        if pixel_hash is not None:
            finds.append(lambda s: s.find_pixel(KEY, pixel_hash))
        for find in finds:
            hit = self.guard.call(find)
            if hit is not None and hit.mask_digest is not None:
                yield hit

    def put(self, fp: Fingerprint, alpha_png: bytes) -> str | None:
        """Store the correction of ``fp``'s source, replacing an earlier one; its blob
        digest, or None if it was not stored."""
        self.drop(fp.sha256, fp.pixel_hash)
        entry = self.guard.call(lambda s: s.put(KEY, "touchup", replace(fp, embedding=None),
                                                alpha_png, None))
        return entry.mask_digest if entry is not None else None

    def drop(self, sha256: str, pixel_hash: str | None = None) -> int:
        """Remove the corrections of these bytes and pixels; how many there were."""
        ids = []
        for _ in range(8):  # find returns one row at a time
            hit = self.guard.call(lambda s: s.find_exact(KEY, sha256))
            if hit is None and pixel_hash is not None:
                hit = self.guard.call(lambda s: s.find_pixel(KEY, pixel_hash))
            if hit is None:
                break
            self.guard.call(lambda s: s.delete([hit.id]))
            ids.append(hit.id)
        return len(ids)


@dataclass(frozen=True)
class Work:
    """A source being touched up: decoded, fingerprinted, and its current alpha."""

    sha256: str
    basis: tuple  # what the alpha was made for (mask key, refine mode, detail)
    decoded: Any  # daemon.imaging.decode.Decoded
    fp: Fingerprint
    alpha: np.ndarray  # full size
    digest: str | None  # the stored correction this alpha is (None: none stored)
    mask: np.ndarray | None = None  # the model's working-size mask: the backdrop's guide


class Workbench:
    """At most one ``Work`` (a 24 MP source holds about 100 MB), let go ``ttl_s`` after
    it was last kept (a timer thread). ``take`` hands it out and forgets it, so two
    touch-ups never share it."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._work: Work | None = None
        self._timer: threading.Timer | None = None
        self._preparing: tuple[str, threading.Event] | None = None

    @contextmanager
    def preparing(self, sha256: str) -> Iterator[None]:
        """Around the making of a source's work ahead of its touch-up: a ``take`` of
        that source meanwhile waits for it instead of decoding the source a second time."""
        done = threading.Event()
        with self._lock:
            self._preparing = (sha256, done)
        try:
            yield
        finally:
            with self._lock:
                if self._preparing is not None and self._preparing[1] is done:
                    self._preparing = None
            done.set()

    def wait_prepared(self, sha256: str, wait_s: float = 60.0) -> None:
        """Return once this source's work is no longer being prepared (or after
        ``wait_s``); at once if it is not."""
        with self._lock:
            preparing = self._preparing
        if preparing is not None and preparing[0] == sha256:
            preparing[1].wait(wait_s)

    def take(self, sha256: str, basis: tuple) -> Work | None:
        """The work kept for this source and basis (then no longer kept), or None."""
        with self._lock:
            work, self._work = self._work, None
        if work is None or (work.sha256, work.basis) != (sha256, basis):
            return None
        return work

    def keep(self, work: Work) -> None:
        timer = threading.Timer(self.ttl_s, self.drop)
        timer.daemon = True
        with self._lock:
            old, self._work, self._timer = self._timer, work, timer
        if old is not None:
            old.cancel()
        timer.start()

    def drop(self) -> None:
        with self._lock:
            self._work = None

    @property
    def holding(self) -> bool:
        return self._work is not None
