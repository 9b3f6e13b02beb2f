"""The pipeline: image bytes + a render plan -> one mask -> every deliverable's bytes.

Tiers, cheapest first: stored outputs for these exact bytes (no decode, no
encode), then a cached mask for the same bytes, the same pixels or a verified
near-duplicate, and only then inference. One mask feeds every deliverable.
Masks are keyed by what changes a mask (model, its checksum, post-processing);
encoded outputs by the mask key plus the deliverable's render options, so a
new deliverable or another background re-renders from the cached mask.

It never sees a path: ``daemon.job`` reads the source and writes the files.
"""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np
import structlog
from PIL import Image

from daemon.cache.base import Entry, StoreError
from daemon.cache.guard import CacheGuard
from daemon.config import CacheConfig, Deliverable, OutputOptions
from daemon.coord.leases import try_lease, waiting_lease
from daemon.imaging import fingerprint as fpmod
from daemon.imaging import match
from daemon.budget import PixelBudget
from daemon.imaging.decode import Decoded, decode, probe_pixels
from daemon.imaging.refine import refine
from daemon.imaging.render import (Target, decode_mask, encode_mask, fit_mask,
                                   mask_key, predict_mask, render_target, targets, working_mask_size)
from daemon.inference.engine import Engines

log = structlog.get_logger("rembgd.pipeline")

FLIGHT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Plan:
    """What one source must become: mask options and the deliverables (empty: legacy PNG)."""

    options: OutputOptions
    outputs: tuple[Deliverable, ...] = ()


@dataclass
class Rendered:
    files: dict[str, bytes]  # target name ("" for the legacy PNG) -> encoded bytes
    tier: str  # exact | pixel | near | miss
    errors: dict[str, BaseException] = field(default_factory=dict)  # target -> why it failed
    entry_id: str | None = None
    metrics: dict = field(default_factory=dict)
    inferred: bool = False
    sha256: str | None = None  # of the source bytes
    deferred: list[Callable[[], None]] = field(default_factory=list)  # cache writes to run

    def store(self) -> None:
        """Run the cache writes held back by ``render(..., defer_store=True)``."""
        while self.deferred:
            self.deferred.pop(0)()


@dataclass(frozen=True)
class _Source:
    decoded: Decoded
    small: np.ndarray  # fingerprint.working_copy of decoded.rgb: the model's input

    @property
    def size(self) -> tuple[int, int]:
        return self.decoded.width, self.decoded.height


@dataclass
class _Mask:
    mask: np.ndarray  # at working size (<= render.MASK_EDGE on the long side)
    tier: str
    entry_id: str | None  # the mask's cache entry (None: not cached)
    mask_digest: str | None = None  # its blob, shared by every output row
    metrics: dict = field(default_factory=dict)
    mask_nbytes: int = 0  # the size of that blob
    pending: list[Callable[[], None]] = field(default_factory=list)  # cache writes it owes


class Pipeline:
    def __init__(self, engines: Engines, guard: CacheGuard | None, cache: CacheConfig, *,
                 max_pixels: int, claim_ttl_s: float = 60.0, budget: PixelBudget | None = None):
        self.engines = engines
        self.budget = budget or PixelBudget(120_000_000)
        self.guard = guard if cache.enabled else None
        self.cache = cache
        self.max_pixels = max_pixels
        self.claim_ttl_s = claim_ttl_s
        self.locks = self.guard.locks if self.guard is not None else None
        self.inferences = 0  # mask inferences run by this pipeline (tests, status)
        self._inflight: dict[str, threading.Event] = {}
        self._inflight_lock = threading.Lock()

    # ------------------------------------------------------------ keys

    def mask_key(self, options: OutputOptions) -> str:
        """Verifies the model file (no ONNX session, no rembg import) and keys its masks."""
        return mask_key(options, self.engines.model_file(options.model).md5)

    def targets(self, plan: Plan) -> list[Target]:
        return targets(self.mask_key(plan.options), plan.options, plan.outputs)

    # ------------------------------------------------------------ cache helpers

    def _call(self, fn_name: str, *args, default=None):
        if self.guard is None:
            return default
        return self.guard.call(lambda store: getattr(store, fn_name)(*args), default=default)

    def _blob(self, entry: Entry, digest: str | None) -> bytes | None:
        """A verified blob, or None; a bad blob drops its entry (a miss, repaired later)."""
        if digest is None:
            return None
        data = self._call("get_blob", digest)
        if data is None:
            log.warning("cache_blob_invalid", entry=entry.id, digest=digest[:12],
                        effect="entry dropped; counted as a miss")
            self._call("delete", [entry.id])
        return data

    # ------------------------------------------------------------ core

    def render(self, data: bytes, plan: Plan, *, defer_store: bool = False) -> Rendered:
        """Every deliverable of ``plan`` for these image bytes. Raises DecodeError for a
        bad image and ModelError for a missing model; a deliverable that cannot be
        rendered is reported in ``errors`` while the others are returned. With
        ``defer_store``, storing the encoded outputs in the cache waits for
        ``Rendered.store()`` (the job writes the files first)."""
        wanted = self.targets(plan)
        sha = fpmod.sha256_bytes(data)
        stored = self._stored_outputs(wanted, sha)
        if stored is not None:
            files, entry_id = stored
            self._call("record", entry_id, "exact")
            return Rendered(files, "exact", entry_id=entry_id, sha256=sha)

        with self.budget.hold(probe_pixels(data)):
            rendered = self._render_decoded(data, sha, plan, wanted)
        if not defer_store:
            rendered.store()
        return rendered

    def _render_decoded(self, data: bytes, sha: str, plan: Plan, wanted: list[Target]
                        ) -> Rendered:
        decoded = decode(data, max_pixels=self.max_pixels)
        # One reduced copy (an exact box reduction, shorter side 512-1023 px) feeds the
        # fingerprints, the embedding and the model: no full-size resize before the mask.
        small = fpmod.working_copy(Image.fromarray(decoded.rgb, "RGB"))
        fp = fpmod.fingerprint(data, decoded.rgb, sha256=sha, small=small)
        mkey = wanted[0].mask_key
        found = self._mask(mkey, plan.options, fp, _Source(decoded, np.asarray(small)))
        del small
        files, errors, full_masks = {}, {}, {}  # one full-size mask per refine mode
        for target in wanted:
            try:
                if target.refine not in full_masks:
                    full_masks[target.refine] = refine(decoded.rgb, found.mask, target.refine)
                files[target.name] = render_target(target, decoded, full_masks[target.refine])
            except Exception as exc:  # one deliverable's fault; the others still ship
                log.warning("deliverable_failed", output=target.name or "png",
                            error=f"{type(exc).__name__}: {exc}")
                errors[target.name] = exc
        deferred = list(found.pending)  # the alias row first: output rows name it as origin
        if self.cache.store_outputs:
            deferred += [partial(self._store_output, target, fp, found, files[target.name])
                         for target in wanted if target.name in files]
        return Rendered(files, found.tier, errors, found.entry_id, found.metrics,
                        inferred=found.tier == "miss", sha256=sha, deferred=deferred)

    def _stored_outputs(self, wanted: list[Target], sha: str):
        """Every target's stored bytes for exactly these source bytes, or None."""
        if self.guard is None or not self.cache.store_outputs:
            return None
        files, first = {}, None
        for target in wanted:
            hit = self._call("find_exact", target.output_key, sha)
            blob = self._blob(hit, hit.output_digest) if hit and hit.output_digest else None
            if blob is None:
                return None
            files[target.name] = blob
            first = first or hit.origin or hit.id
        return files, first

    def _store_output(self, target: Target, fp: fpmod.Fingerprint, found: _Mask,
                      data: bytes) -> None:
        """An output row keyed by the render options; it shares the mask's blob."""
        if self.guard is None or found.mask_digest is None:
            return

        def put(store) -> None:
            now = time.time()
            store.restore(Entry(id=uuid.uuid4().hex, key=target.output_key, model=target.model,
                                fp=replace(fp, embedding=None), mask_digest=found.mask_digest,
                                output_digest=store.put_blob(data),
                                nbytes=found.mask_nbytes + len(data), created=now, last_hit=now,
                                hits=0, origin=found.entry_id))

        self.guard.call(put)

    # ------------------------------------------------------------ masks

    def _mask(self, mkey: str, options: OutputOptions, fp: fpmod.Fingerprint,
              src: _Source) -> _Mask:
        if self.guard is None:
            return self._infer(mkey, options, fp, src, store=False)
        found, fp = self._lookup(mkey, fp, src)
        if found is not None:
            return found
        flight = f"flight:{mkey}:{fp.pixel_hash}"
        with self._inflight_lock:  # one inference per image in this process...
            event = self._inflight.get(flight)
            leader = event is None
            if leader:
                self._inflight[flight] = event = threading.Event()
        try:
            if not leader:
                event.wait(timeout=FLIGHT_TIMEOUT_S)
                found, fp = self._lookup(mkey, fp, src)
                if found is not None:
                    return found
            with self._flight_lease(flight) as waited:  # ...and across processes
                if waited:
                    found, fp = self._lookup(mkey, fp, src)
                    if found is not None:
                        return found
                return self._infer(mkey, options, fp, src, store=True)
        finally:
            if leader:
                with self._inflight_lock:
                    self._inflight.pop(flight, None)
                event.set()

    @contextmanager
    def _flight_lease(self, name: str):
        """Yields whether another process held the flight (then the cache is re-checked).
        Best effort: an unreachable lock backend only costs a duplicate inference."""
        waited = False
        with ExitStack() as stack:
            if self.locks is not None:
                try:
                    lease = try_lease(self.locks, name, self.claim_ttl_s)
                    if lease is not None:
                        stack.callback(lease.release)
                    else:
                        waited = True
                        stack.enter_context(waiting_lease(self.locks, name, self.claim_ttl_s,
                                                          timeout=FLIGHT_TIMEOUT_S))
                except StoreError as exc:
                    self.guard.failed(exc)
            yield waited

    def _lookup(self, mkey: str, fp: fpmod.Fingerprint, src: _Source
                ) -> tuple[_Mask | None, fpmod.Fingerprint]:
        """A cached mask for these bytes, these pixels or a verified near-duplicate."""
        for tier, finder, value in (("exact", "find_exact", fp.sha256),
                                    ("pixel", "find_pixel", fp.pixel_hash)):
            hit = self._call(finder, mkey, value)
            raw = self._blob(hit, hit.mask_digest) if hit is not None else None
            if raw is not None:
                self._call("record", hit.id, tier)
                entry_id, pending = hit.origin or hit.id, []
                if tier == "pixel" and fp.sha256 != hit.fp.sha256:
                    entry_id, write = self._alias(hit, fp, len(raw))
                    pending.append(write)
                mask = fit_mask(decode_mask(raw), *working_mask_size(fp.width, fp.height))
                return _Mask(mask, tier, entry_id, hit.mask_digest, mask_nbytes=len(raw),
                             pending=pending), fp

        t = self.cache.match
        cands = self._call("find_near", mkey, fp.phash, t.phash_radius, default=[])
        if not cands:
            return None, fp
        if fp.embedding is None:
            fp = replace(fp, embedding=self.engines.embedder().embed(src.small))
        for cand in cands:
            verdict = match.verify(fp, cand.fp, t)
            if not verdict.accepted:
                log.debug("near_rejected", candidate=cand.id, reason=verdict.reason,
                          **verdict.metrics)
                continue
            raw = self._blob(cand, cand.mask_digest)
            if raw is None:
                continue
            self._call("record", cand.id, "near")
            mask = fit_mask(decode_mask(raw), *working_mask_size(fp.width, fp.height))
            alias_id, write = self._alias(cand, fp, len(raw))
            return _Mask(mask, "near", alias_id, cand.mask_digest, verdict.metrics, len(raw),
                         [write]), fp
        return None, fp

    def _alias(self, hit: Entry, fp: fpmod.Fingerprint, mask_nbytes: int
               ) -> tuple[str, Callable[[], None]]:
        """New bytes, a known mask: an alias row sharing the original's mask blob (never
        re-encoded or copied) makes the next copy of these bytes an exact hit. Returns
        its id and the write, which waits until the files are out (``Rendered.store``)."""
        now = time.time()
        alias = replace(hit, id=uuid.uuid4().hex, fp=replace(fp, embedding=hit.fp.embedding),
                        output_digest=None, nbytes=mask_nbytes, created=now, last_hit=now,
                        hits=0, origin=hit.origin or hit.id)
        return alias.id, partial(self.guard.call, lambda store: store.restore(alias))

    def _infer(self, mkey: str, options: OutputOptions, fp: fpmod.Fingerprint,
               src: _Source, *, store: bool) -> _Mask:
        mask = predict_mask(self.engines.mask(options.model), src.small, options, src.size)
        self.inferences += 1
        if not store:
            return _Mask(mask, "miss", None)
        if fp.embedding is None:
            fp = replace(fp, embedding=self.engines.embedder().embed(src.small))
        png = encode_mask(mask)
        entry = self.guard.call(lambda s: s.put(mkey, options.model, fp, png, None), default=None)
        self._call("record", None, "miss")
        if entry is None:
            return _Mask(mask, "miss", None)
        return _Mask(mask, "miss", entry.id, entry.mask_digest, mask_nbytes=len(png))
