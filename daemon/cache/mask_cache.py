"""The mask cache: typed lookups, aliases and commits over the ``CacheGuard``.

Tiers, cheapest first, for one mask key:

* ``stored_outputs``: every deliverable already encoded for exactly these source
  bytes (no decode, no encode);
* ``lookup``: a mask for the same bytes (``exact``), the same decoded pixels
  (``pixel``) or a verified near-duplicate (``near``);
* otherwise the caller infers and ``put_mask`` stores the mask at once (other
  daemons in the same flight are waiting for it).

Writes that must wait until the job's files are out (an alias row for new bytes
of a known mask, one output row per deliverable) are values (``AliasRow``,
``OutputRow``); the job hands them to ``commit`` after writing its files. Every
store call goes through the guard: a failing store degrades to a miss.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import numpy as np
import structlog

from daemon.cache.base import Entry, Store, Tier
from daemon.cache.guard import CacheGuard
from daemon.config import CacheConfig
from daemon.imaging import match
from daemon.imaging.fingerprint import Fingerprint
from daemon.imaging.keys import Target

log = structlog.get_logger("rembgd.pipeline")


@dataclass(frozen=True)
class AliasRow:
    """New bytes of a known mask: a row sharing the original's mask blob (never copied),
    so the next copy of these bytes is an exact hit."""

    entry: Entry


@dataclass(frozen=True)
class OutputRow:
    """One deliverable's encoded bytes, keyed by its render options; shares the mask blob."""

    output_key: str
    model: str
    fp: Fingerprint
    mask_digest: str
    mask_nbytes: int
    origin: str | None  # the mask's entry
    data: bytes


CacheWrite = Union[AliasRow, OutputRow]


@dataclass(frozen=True)
class MaskHit:
    """A mask found in (or just put into) the cache, as its stored PNG."""

    mask_png: bytes
    tier: Tier  # MISS: just stored
    entry_id: str | None  # the entry output rows name as origin (None: not stored)
    mask_digest: str | None
    metrics: dict = field(default_factory=dict)  # the near match's verification values
    alias: AliasRow | None = None  # to commit with the outputs


@dataclass(frozen=True)
class StoredOutputs:
    files: dict[str, bytes]  # target name -> encoded bytes
    entry_id: str


class Probe:
    """A source's fingerprint for lookups; its embedding (only a near search and a
    stored mask need it) is computed on first use, once."""

    def __init__(self, fp: Fingerprint, embed: Callable[[], np.ndarray]):
        self._fp, self._embed = fp, embed

    @property
    def fp(self) -> Fingerprint:
        return self._fp

    def embedded(self) -> Fingerprint:
        if self._fp.embedding is None:
            self._fp = replace(self._fp, embedding=self._embed())
        return self._fp


class MaskCache:
    """See the module docstring. ``guard``: the opened cache (the caller decides it is on)."""

    def __init__(self, guard: CacheGuard, cache: CacheConfig):
        self.guard = guard
        self.cache = cache

    # ------------------------------------------------------------ reads

    def stored_outputs(self, wanted: Sequence[Target], sha256: str) -> StoredOutputs | None:
        """Every target's stored bytes for exactly these source bytes (counted as an
        exact hit), or None."""
        if not self.cache.store_outputs:
            return None
        files, first = {}, None
        for target in wanted:
            hit = self.guard.call(lambda s: s.find_exact(target.output_key, sha256))
            blob = self._blob(hit, hit.output_digest) if hit and hit.output_digest else None
            if blob is None:
                return None
            files[target.name] = blob
            first = first or hit.origin or hit.id
        self._record(first, Tier.EXACT)
        return StoredOutputs(files, first)

    def lookup(self, mkey: str, probe: Probe) -> MaskHit | None:
        """A cached mask for these bytes, these pixels or a verified near-duplicate."""
        fp = probe.fp
        for tier, find in ((Tier.EXACT, lambda s: s.find_exact(mkey, fp.sha256)),
                           (Tier.PIXEL, lambda s: s.find_pixel(mkey, fp.pixel_hash))):
            hit = self.guard.call(find)
            raw = self._blob(hit, hit.mask_digest) if hit is not None else None
            if raw is not None:
                self._record(hit.id, tier)
                if tier is Tier.PIXEL and fp.sha256 != hit.fp.sha256:
                    alias = self._alias(hit, fp, len(raw))
                    return MaskHit(raw, tier, alias.entry.id, hit.mask_digest, alias=alias)
                return MaskHit(raw, tier, hit.origin or hit.id, hit.mask_digest)

        t = self.cache.match
        cands = self.guard.call(lambda s: s.find_near(mkey, fp.phash, t.phash_radius), default=[])
        if not cands:
            return None
        fp = probe.embedded()
        for cand in cands:
            verdict = match.verify(fp, cand.fp, t)
            if not verdict.accepted:
                log.debug("near_rejected", candidate=cand.id, reason=verdict.reason,
                          **verdict.metrics)
                continue
            raw = self._blob(cand, cand.mask_digest)
            if raw is None:
                continue
            self._record(cand.id, Tier.NEAR)
            alias = self._alias(cand, fp, len(raw))
            return MaskHit(raw, Tier.NEAR, alias.entry.id, cand.mask_digest, verdict.metrics, alias)
        return None

    # ----------------------------------------------------------- writes

    def put_mask(self, mkey: str, model: str, probe: Probe, mask_png: bytes) -> MaskHit:
        """Store an inferred mask now (counted as a miss); ``entry_id`` None if it failed."""
        fp = probe.embedded()
        entry = self.guard.call(lambda s: s.put(mkey, model, fp, mask_png, None))
        self._record(None, Tier.MISS)
        if entry is None:
            return MaskHit(mask_png, Tier.MISS, None, None)
        return MaskHit(mask_png, Tier.MISS, entry.id, entry.mask_digest)

    def output_rows(self, hit: MaskHit, fp: Fingerprint, wanted: Sequence[Target],
                    files: dict[str, bytes]) -> list[CacheWrite]:
        """What ``commit`` writes for this render: the alias row first (the output rows
        name it as origin), then a row per rendered file when outputs are stored."""
        writes: list[CacheWrite] = [hit.alias] if hit.alias is not None else []
        if self.cache.store_outputs and hit.mask_digest is not None:
            writes += [OutputRow(t.output_key, t.model, replace(fp, embedding=None),
                                 hit.mask_digest, len(hit.mask_png), hit.entry_id,
                                 files[t.name]) for t in wanted if t.name in files]
        return writes

    def commit(self, writes: Sequence[CacheWrite]) -> None:
        """Write the rows a render left pending, in order; a failing store skips them."""
        for write in writes:
            self.guard.call(_write, write)

    # ---------------------------------------------------------- helpers

    def _record(self, entry_id: str | None, tier: Tier) -> None:
        self.guard.call(lambda s: s.record(entry_id, tier))

    def _blob(self, entry: Entry, digest: str | None) -> bytes | None:
        """A verified blob, or None; a bad blob drops its entry (a miss, repaired later)."""
        if digest is None:
            return None
        data = self.guard.call(lambda s: s.get_blob(digest))
        if data is None:
            log.warning("cache_blob_invalid", entry=entry.id, digest=digest[:12],
                        effect="entry dropped; counted as a miss")
            self.guard.call(lambda s: s.delete([entry.id]))
        return data

    @staticmethod
    def _alias(hit: Entry, fp: Fingerprint, mask_nbytes: int) -> AliasRow:
        now = time.time()
        return AliasRow(replace(hit, id=uuid.uuid4().hex, fp=replace(fp, embedding=hit.fp.embedding),
                                output_digest=None, nbytes=mask_nbytes, created=now, last_hit=now,
                                hits=0, origin=hit.origin or hit.id))


def _write(store: Store, write: CacheWrite) -> None:
    if isinstance(write, AliasRow):
        store.restore(write.entry)
        return
    now = time.time()
    store.restore(Entry(id=uuid.uuid4().hex, key=write.output_key, model=write.model, fp=write.fp,
                        mask_digest=write.mask_digest, output_digest=store.put_blob(write.data),
                        nbytes=write.mask_nbytes + len(write.data), created=now, last_hit=now,
                        hits=0, origin=write.origin))
