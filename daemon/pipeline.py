"""The render step: image bytes + a plan -> one mask -> every deliverable's bytes, as a value.

Tiers, cheapest first (``daemon.cache.mask_cache``): stored outputs for these
exact bytes (no decode, no encode), then a cached mask for the same bytes, the
same pixels or a verified near-duplicate, and only then inference, one per
image at a time (``daemon.coord.flight``). One mask feeds every deliverable.
Every file is stamped with its source's sha256 (``daemon.imaging.stamp``); the
cache stores them unstamped.

``render`` writes nothing but an inferred mask (the daemons waiting in its
flight need it at once). It returns ``Rendered``: the bytes per target, the
tier, and the cache writes still to do, as data. The job writes the files,
then hands those writes to ``MaskCache.commit``. It never sees a path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import structlog

from daemon.budget import PixelBudget
from daemon.cache.base import Tier
from daemon.cache.corrections import Corrections, Work, Workbench
from daemon.cache.guard import CacheGuard
from daemon.cache.mask_cache import CacheWrite, MaskCache, MaskHit, Probe
from daemon.config import CacheConfig, Deliverable, OutputOptions
from daemon.coord.flight import SingleFlight
from daemon.coord.locks import LockBackend
from daemon.imaging import confidence, touchup
from daemon.imaging import fingerprint as fpmod
from daemon.imaging.confidence import Confidence
from daemon.imaging.decode import decode, probe_pixels
from daemon.imaging.keys import Target, mask_key, targets
from daemon.imaging.png import encode_png
from daemon.imaging.matte import Matte
from daemon.imaging.render import (decode_mask, encode_mask, fit_mask, predict_mask,
                                   render_target, stamp_files, working_mask_size)
from daemon.inference.engine import Engines

log = structlog.get_logger("rembgd.pipeline")


@dataclass(frozen=True)
class Plan:
    """What one source must become: mask options and the deliverables (empty: legacy PNG)."""

    options: OutputOptions
    outputs: tuple[Deliverable, ...] = ()
    judge: bool = False  # score the mask's confidence (review); stored outputs are not reused


@dataclass(frozen=True)
class Rendered:
    files: Mapping[str, bytes]  # target name ("" for the legacy PNG) -> encoded bytes
    tier: Tier
    errors: Mapping[str, BaseException] = field(default_factory=dict)  # target -> why it failed
    entry_id: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    sha256: str | None = None  # of the source bytes
    cache_writes: tuple[CacheWrite, ...] = ()  # for MaskCache.commit, once the files are out
    confidence: Confidence | None = None  # with Plan.judge
    inference_s: float | None = None  # seconds the model ran (a miss)

    @property
    def inferred(self) -> bool:
        return self.tier is Tier.MISS


class Pipeline:
    """``guard`` and ``locks``: the opened cache and its lock backend (None: no cache)."""

    def __init__(self, engines: Engines, guard: CacheGuard | None, locks: LockBackend | None,
                 cache: CacheConfig, *, max_pixels: int, claim_ttl_s: float = 60.0,
                 budget: PixelBudget | None = None):
        self.engines = engines
        self.budget = budget or PixelBudget(120_000_000)
        self.max_pixels = max_pixels
        self.masks = MaskCache(guard, cache) if guard is not None else None
        self.corrections = Corrections(guard) if guard is not None else None
        self.workbench = Workbench()  # the source being touched up, decoded
        self.flight = SingleFlight(locks, claim_ttl_s, guard.failed) if guard is not None else None
        self.inferences = 0  # mask inferences run by this pipeline (tests, status)

    def mask_key(self, options: OutputOptions) -> str:
        """Verifies the model file (no ONNX session, no rembg import) and keys its masks."""
        return mask_key(options, self.engines.model_file(options.model).md5)

    def targets(self, plan: Plan) -> list[Target]:
        return targets(self.mask_key(plan.options), plan.options, plan.outputs)

    def render(self, data: bytes, plan: Plan) -> Rendered:
        """Every deliverable of ``plan`` for these image bytes. Raises DecodeError for a
        bad image and ModelError for a missing model; a deliverable that cannot be
        rendered is reported in ``errors`` while the others are returned."""
        wanted = self.targets(plan)
        sha = fpmod.sha256_bytes(data)
        # a retoucher's correction comes first: never the stored outputs of the model's mask
        corrected = self.corrections is not None and self.corrections.find(sha) is not None
        # a judged plan goes through the cached mask: a hit is scored like a miss
        stored = self.masks.stored_outputs(wanted, sha) \
            if self.masks is not None and not plan.judge and not corrected else None
        if stored is not None:
            return Rendered(stamp_files(stored.files, wanted, sha), Tier.EXACT,
                            entry_id=stored.entry_id, sha256=sha)
        with self.budget.hold(probe_pixels(data)):
            rendered = self._render_decoded(data, sha, plan, wanted)
        # the cache writes hold the plain bytes: a hit of other source bytes is stamped anew
        return replace(rendered, files=stamp_files(rendered.files, wanted, sha))

    def _render_decoded(self, data: bytes, sha: str, plan: Plan, wanted: list[Target]
                        ) -> Rendered:
        # One reduced copy (an exact box reduction, shorter side 512-1023 px) feeds the
        # fingerprints, the embedding and the model: no full-size resize before the mask.
        decoded = decode(data, max_pixels=self.max_pixels, reduce=fpmod.working_copy)
        small = decoded.small
        fp = fpmod.fingerprint(data, decoded.rgb, sha256=sha, small=small)
        corrected = self.corrections.find(sha, fp.pixel_hash) \
            if self.corrections is not None else None
        if corrected is not None:  # touched up: done as the retoucher left it, never judged
            alpha = fit_mask(decode_mask(corrected), decoded.width, decoded.height)
            guide = self._guide(wanted, plan, fp, decoded)
            files, errors = self._render_alpha(wanted, decoded, alpha, guide)
            return Rendered(files, Tier.EXACT, errors, sha256=sha)
        mask, hit, inference_s = self._mask(wanted[0].mask_key, plan.options, fp,
                                            np.asarray(small), (decoded.width, decoded.height))
        judged = confidence.score(mask, np.asarray(small)) if plan.judge else None
        # one alpha per mode, shared by the targets
        files, errors = self._render_matte(wanted, decoded, Matte(decoded.rgb, decoded.full, mask))
        if hit is None:  # no cache
            return Rendered(files, Tier.MISS, errors, sha256=sha, confidence=judged,
                            inference_s=inference_s)
        writes = self.masks.output_rows(hit, fp, wanted, files)
        return Rendered(files, hit.tier, errors, hit.entry_id, hit.metrics, sha, tuple(writes),
                        judged, inference_s)

    def touch_up(self, data: bytes, plan: Plan, strokes: list[touchup.Stroke]) -> Rendered:
        """Every deliverable of ``plan`` with ``strokes`` applied to the source's current
        alpha (its correction, or the model's mask refined as the plan's first target
        refines it); the new alpha is stored as the source's correction (with a cache).
        The source stays decoded on the workbench for the next touch-up of it."""
        wanted = self.targets(plan)
        sha = fpmod.sha256_bytes(data)
        basis = (wanted[0].mask_key, *wanted[0].alpha_key)  # mask, refine mode, detail
        self.workbench.wait_prepared(sha)  # (before the budget: the preparing holds some)
        with self.budget.hold(probe_pixels(data)):
            work = self._work(data, sha, plan, basis)
            alpha = touchup.apply(work.decoded.rgb, work.alpha, strokes, basis[1])
            digest = None
            if self.corrections is not None:
                digest = self.corrections.put(work.fp, encode_png(alpha, level=1))
            files, errors = self._render_alpha(wanted, work.decoded, alpha, work.mask)
        self.workbench.keep(replace(work, alpha=alpha, digest=digest))
        return Rendered(stamp_files(files, wanted, sha), Tier.EXACT, errors, sha256=sha)

    def prepare_touch_up(self, data: bytes, plan: Plan) -> None:
        """Put the source on the workbench ahead of its touch-up (while the retoucher
        draws): decoded, fingerprinted, its current alpha made."""
        wanted = self.targets(plan)
        sha = fpmod.sha256_bytes(data)
        basis = (wanted[0].mask_key, *wanted[0].alpha_key)  # mask, refine mode, detail
        with self.workbench.preparing(sha), self.budget.hold(probe_pixels(data)):
            work = self._work(data, sha, plan, basis)
            self.workbench.keep(work)

    def _work(self, data: bytes, sha: str, plan: Plan, basis: tuple) -> Work:
        """The source decoded with its current alpha: from the workbench while the
        correction stored is still the one it holds, else decoded now."""
        work = self.workbench.take(sha, basis)
        if work is not None:
            stored = self.corrections.digest(sha, work.fp.pixel_hash) \
                if self.corrections is not None else None
            if stored == work.digest:
                return work
        decoded = decode(data, max_pixels=self.max_pixels, reduce=fpmod.working_copy)
        fp = fpmod.fingerprint(data, decoded.rgb, sha256=sha, small=decoded.small)
        size = (decoded.width, decoded.height)
        current = self.corrections.current(sha, fp.pixel_hash) \
            if self.corrections is not None else None
        mask = self._mask(basis[0], plan.options, fp, np.asarray(decoded.small), size)[0]
        if current is not None:
            alpha = fit_mask(decode_mask(current[1]), *size)
        else:
            alpha = Matte(decoded.rgb, decoded.full, mask).alpha(*basis[1:])  # as delivered
        return Work(sha, basis, decoded, fp, alpha, current[0] if current else None, mask)

    def _guide(self, wanted: list[Target], plan: Plan, fp: fpmod.Fingerprint, decoded
               ) -> np.ndarray | None:
        """The model's mask of a touched-up source (cached: a lookup, no inference), so
        that its edge colours come from the backdrop its first cutout had; None without
        a cache entry (the backdrop is then fitted around the correction itself)."""
        if self.masks is None:
            return None
        hit = self.masks.lookup(wanted[0].mask_key, Probe(fp, lambda: self.engines.embedder(
            ).embed(np.asarray(decoded.small))))
        if hit is None:
            return None
        return fit_mask(decode_mask(hit.mask_png), *working_mask_size(decoded.width,
                                                                      decoded.height))

    def forget_correction(self, data: bytes) -> bool:
        """Drop the correction of these bytes (and their pixels); whether there was one."""
        self.workbench.drop()
        if self.corrections is None:
            return False
        decoded = decode(data, max_pixels=self.max_pixels, reduce=fpmod.working_copy)
        fp = fpmod.fingerprint(data, decoded.rgb, small=decoded.small)
        return self.corrections.drop(fp.sha256, fp.pixel_hash) > 0

    @staticmethod
    def _render_alpha(wanted: list[Target], decoded, alpha: np.ndarray,
                      guide: np.ndarray | None
                      ) -> tuple[dict[str, bytes], dict[str, BaseException]]:
        """Every target from one decided alpha (a retoucher's), despilled like any other
        (``guide``: the model's mask, which places the backdrop as in the first cutout)."""
        return Pipeline._render_matte(wanted, decoded,
                                      Matte.decided(decoded.rgb, decoded.full, alpha, guide))

    @staticmethod
    def _render_matte(wanted: list[Target], decoded, matte: Matte
                      ) -> tuple[dict[str, bytes], dict[str, BaseException]]:
        """Every target from one photo's matte (its alpha and edge colours per mode)."""
        files, errors = {}, {}
        for target in wanted:
            try:
                alpha = matte.alpha(*target.alpha_key)
                patch = matte.colours(*target.alpha_key) if _despills(target) else None
                files[target.name] = render_target(target, decoded, alpha, patch)
            except Exception as exc:  # one deliverable's fault; the others still ship
                log.warning("deliverable_failed", output=target.name or "png",
                            error=f"{type(exc).__name__}: {exc}")
                errors[target.name] = exc
        return files, errors

    def _mask(self, mkey: str, options: OutputOptions, fp: fpmod.Fingerprint,
              small: np.ndarray, size: tuple[int, int]
              ) -> tuple[np.ndarray, MaskHit | None, float | None]:
        """The working-size mask, the cache hit (or stored miss) it came from, and the
        seconds of inference it took (None: a hit)."""
        seconds: list[float] = []
        if self.masks is None:
            return self._infer(options, small, size, seconds), None, seconds[0]
        probe = Probe(fp, lambda: self.engines.embedder().embed(small))

        def cached() -> tuple[np.ndarray, MaskHit] | None:
            hit = self.masks.lookup(mkey, probe)
            if hit is None:
                return None
            return fit_mask(decode_mask(hit.mask_png), *working_mask_size(*size)), hit

        def inferred() -> tuple[np.ndarray, MaskHit]:
            mask = self._infer(options, small, size, seconds)
            return mask, self.masks.put_mask(mkey, options.model, probe, encode_mask(mask))

        mask, hit = cached() or self.flight.run(f"{mkey}:{fp.pixel_hash}", cached, inferred)
        return mask, hit, (seconds[0] if seconds else None)

    def _infer(self, options: OutputOptions, small: np.ndarray, size: tuple[int, int],
               seconds: list[float]) -> np.ndarray:
        """The model's mask; appends the seconds it took to ``seconds``."""
        start = time.perf_counter()
        mask = predict_mask(self.engines.mask(options.model), small, options, size)
        seconds.append(time.perf_counter() - start)
        self.inferences += 1
        return mask


def _despills(target: Target) -> bool:
    """Despill on, and a cutout whose colours it changes (not the mask PNG, not rembg's
    own alpha matting or background colour)."""
    if not target.despill:
        return False
    o = target.options
    return target.deliverable is not None or not (
        o.only_mask or o.alpha_matting.enabled or o.bgcolor is not None)
