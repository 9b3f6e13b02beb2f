"""Retouchers' corrections: a touched-up alpha kept in the cache for its source.

A correction is a full-size alpha (8-bit PNG) stored as an ordinary cache entry under
its own key, ``KEY``, whatever the model: the same bytes (``sha256``) or the same
decoded pixels (``pixel_hash``: a re-encode, other metadata) find it. The pipeline
asks here before anything else, so a correction wins over the model's mask, over
stored outputs and over a near-duplicate's mask; re-dropping the photo or adding a
deliverable later renders from it. ``drop`` (revert) removes it, and the model's mask
is used again. Every call goes through the guard: a failing store is a miss here too.
"""
from __future__ import annotations

from dataclasses import replace

from daemon.cache.guard import CacheGuard
from daemon.imaging.fingerprint import Fingerprint

KEY = "touchup:1"  # every model's: a correction is the retoucher's, not a model's


class Corrections:
    def __init__(self, guard: CacheGuard):
        self.guard = guard

    def find(self, sha256: str, pixel_hash: str | None = None) -> bytes | None:
        """The corrected alpha (PNG) for these bytes, or these pixels; None if none."""
        finds = [lambda s: s.find_exact(KEY, sha256)]
        if pixel_hash is not None:
            finds.append(lambda s: s.find_pixel(KEY, pixel_hash))
        for find in finds:
            hit = self.guard.call(find)
            if hit is not None and hit.mask_digest is not None:
                data = self.guard.call(lambda s: s.get_blob(hit.mask_digest))
                if data is not None:
                    return data
        return None

    def put(self, fp: Fingerprint, alpha_png: bytes) -> bool:
        """Store the correction of ``fp``'s source, replacing an earlier one; whether it
        was stored."""
        self.drop(fp.sha256, fp.pixel_hash)
        entry = self.guard.call(lambda s: s.put(KEY, "touchup", replace(fp, embedding=None),
                                                alpha_png, None))
        return entry is not None

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
