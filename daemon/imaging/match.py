"""Near-duplicate matching, pure: measure two fingerprints, verify, decide.

A cached mask is reused only if *every* check passes (see ``CHECKS``): the
aspect ratio, the pHash distance, a loose embedding gate, and the thumbnail
checks that reject what pHash and embeddings miss (crops, flips, moves,
recolours, local edits). Thresholds: ``config.MatchThresholds``, calibrated by
bench/calibrate.py (bench/calibration.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.config import MatchThresholds
from daemon.imaging.fingerprint import (AB_SIZE, COLOUR_GRID, LUMA_GRID, LUMA_SIZE,
                                        MIN_PIXELS_PER_CELL, Fingerprint, Thumbs, hamming, pool)

# (metric, MatchThresholds field, "max": metric <= threshold passes | "min": >= passes),
# in the order verify() applies them.
CHECKS = (
    ("aspect_delta", "max_aspect_delta", "max"),
    ("phash", "phash_radius", "max"),
    ("cosine", "min_cosine", "min"),
    ("edge_corr", "min_edge_corr", "min"),
    ("luma_max", "max_luma_delta", "max"),
    ("colour_max", "max_colour_delta", "max"),
)
REASONS = {"aspect_delta": "aspect", "phash": "phash", "cosine": "cosine",
           "edge_corr": "structure", "luma_max": "luma", "colour_max": "colour"}
METRIC_DOCS = {
    "aspect_delta": "|log(aspect ratio q / aspect ratio c)| less the slack of 1-pixel rounding.",
    "phash": "Hamming distance of the 256-bit pHashes (the banded index finds every code "
             "within 15).",
    "cosine": "cosine similarity of the EfficientNet-Lite0 embeddings (1280-d, L2-normalised).",
    "edge_corr": "correlation of the L* gradients of the two luma thumbnails, at the finest "
                 "scale (128, 64, 32 or 16 px) where each thumbnail pixel averages >= 3x3 "
                 "pixels of both images.",
    "luma_max": "after fitting L*q ~ a + b L*c + c L*c^2 (exposure, gamma), the largest "
                "|mean residual| (L* units) over a 32x32 grid of regions (one per pixel "
                "below 32 px), same scale as edge_corr.",
    "colour_max": "the largest mean |delta a*b*| (CIELAB chroma distance) over a 16x16 grid of "
                  "regions of the 32x32 chroma thumbnails.",
}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    metrics: dict


def compare_size(*sides: int) -> int:
    """The finest luma scale (128, 64, 32 or 16 px) at which both images are compared.

    Each thumbnail pixel must average at least 3x3 pixels of the smaller image, so the
    two thumbnails are equally well anti-aliased and a resize does not read as a change.
    """
    smallest = min(sides)
    size = LUMA_SIZE
    while size > 16 and smallest < MIN_PIXELS_PER_CELL * size:
        size //= 2
    return size


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the finite-difference gradients of two equally sized luma maps."""
    def grads(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.diff(x, axis=1).ravel(), np.diff(x, axis=0).ravel()])

    ga, gb = grads(a), grads(b)
    ga, gb = ga - ga.mean(), gb - gb.mean()
    # explicit sums, not BLAS: no thread pool to wake up for a 32k-element product
    denom = float(np.sqrt((ga * ga).sum() * (gb * gb).sum()))
    if denom < 1e-6:  # at least one is flat: the same only if both are flat and equally bright
        flat = max(float(np.abs(ga).max()), float(np.abs(gb).max())) < 1.0
        return 1.0 if flat and abs(float(a.mean()) - float(b.mean())) < 3 else 0.0
    return float((ga * gb).sum() / denom)


def tone_residual(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``q`` minus the best quadratic tone curve of ``c`` (absorbs exposure and gamma)."""
    x, y = c.ravel() / 100.0, q.ravel()
    powers = [np.ones_like(x), x, x * x]
    gram = np.array([[float((u * v).sum()) for v in powers] for u in powers])
    rhs = np.array([float((u * y).sum()) for u in powers])
    coef = np.linalg.lstsq(gram + 1e-9 * np.eye(3), rhs, rcond=None)[0]
    return q - (coef[0] + coef[1] * x + coef[2] * x * x).reshape(q.shape)


def thumb_metrics(q: Thumbs, c: Thumbs, size: int) -> dict:
    """Structure and colour metrics of two thumbnails, luma compared at ``size`` px."""
    k = LUMA_SIZE // size
    lq = pool(q.luma.astype(np.float64) / 2.55, k)
    lc = pool(c.luma.astype(np.float64) / 2.55, k)
    dab = np.sqrt(((q.ab.astype(np.float64) - c.ab.astype(np.float64)) ** 2).sum(axis=-1))
    return {
        "edge_corr": edge_correlation(lq, lc),
        "luma_max": float(np.abs(pool(tone_residual(lq, lc), max(1, size // LUMA_GRID))).max()),
        "colour_max": float(pool(dab, AB_SIZE // COLOUR_GRID).max()),
    }


def aspect_delta(wq: int, hq: int, wc: int, hc: int) -> float:
    """Relative aspect-ratio difference, less what 1-pixel rounding can explain."""
    rel = abs(np.log((wq / hq) / (wc / hc)))
    slack = 1.0 / min(wq, hq, wc, hc)
    return float(max(0.0, rel - slack))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(np.float32) * b.astype(np.float32)).sum())


def measure(query: Fingerprint, cand: Fingerprint) -> dict:
    """Every metric of CHECKS for a pair (None where a fingerprint lacks the input)."""
    m: dict = {
        "aspect_delta": aspect_delta(query.width, query.height, cand.width, cand.height),
        "phash": hamming(query.phash, cand.phash),
        "cosine": None,
        "compare_px": compare_size(query.width, query.height, cand.width, cand.height),
    }
    if query.embedding is not None and cand.embedding is not None:
        m["cosine"] = cosine(query.embedding, cand.embedding)
    if query.thumbs.valid and cand.thumbs.valid:
        m.update(thumb_metrics(query.thumbs, cand.thumbs, m["compare_px"]))
    else:
        m.update(dict.fromkeys(("edge_corr", "luma_max", "colour_max")))
    return m


def verify(query: Fingerprint, cand: Fingerprint, t: MatchThresholds) -> Verdict:
    """Accept ``cand``'s mask for ``query`` only if every check of CHECKS passes.

    The reason names the first failed check (``missing`` when a fingerprint lacks its
    embedding or has thumbnails of another layout); ``metrics`` has every value.
    """
    return decide(measure(query, cand), t)


def decide(m: dict, t: MatchThresholds) -> Verdict:
    """Apply the thresholds to the metrics from ``measure``."""
    for metric, field_name, kind in CHECKS:
        value, limit = m[metric], getattr(t, field_name)
        if value is None:
            return Verdict(False, "missing", m)
        if value > limit if kind == "max" else value < limit:
            return Verdict(False, REASONS[metric], m)
    return Verdict(True, "verified", m)
