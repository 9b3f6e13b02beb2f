"""How much to trust a mask: a score in [0, 1] and the reasons that lowered it.

Judged at the model's own resolution (long side ``ANALYSIS_EDGE``, U^2-Net's
320 px output): the working-size mask is an upscale of it, so nothing is lost
and the score costs a few milliseconds at any image size. Each signal is a
penalty that starts past a free allowance; the score is ``exp(-sum)``:

- ``uncertain``: the share of the subject's area in uncertain alpha
  (0.1 < alpha < 0.9): a model that cannot decide, a subject that blends in;
- ``fragments``: the share of the subject outside its largest piece (stray
  blobs, a prop taken for subject, a subject broken apart);
- ``frame``: the subject cut by more than one side of the frame (touching the
  bottom is what a standing product or a portrait does);
- ``see-through`` (needs the image): row by row, the subject's interior follows
  the backdrop beside it, dimmed (slope 0.15-1): the sweep shows through, so the
  subject is glass and an opaque mask is wrong;
- ``edge`` (needs the image): the mask's edge does not sit on an edge of the
  image (mean gradient on the edge against the backdrop ring beside it).

An empty mask, or one that is all subject, scores 0. The allowances were set on
``bench/routing.py``'s calibration seeds and the weights fitted there by a
logistic regression (``bench/routing.py --fit``); the routing threshold it chose
is the default of a pair's ``review.min_confidence`` (``bench/routing.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

ANALYSIS_EDGE = 320
LOW, HIGH = round(0.1 * 255), round(0.9 * 255)  # uncertain alpha: LOW < a < HIGH
SUBJECT = 128  # alpha >= 50%: the subject
EMPTY_AREA, FULL_AREA = 0.002, 0.97  # subject share of the frame
SIDE_SHARE = 0.02  # a frame side is cut when the subject covers this share of it
INTERIOR_PX = 6  # px at analysis size: the subject's interior lies this far inside
RING_PX = (3, 12)  # px at analysis size: the backdrop ring around the subject
_EIGHT = np.ones((3, 3), bool)

# (allowance, weight) per signal: allowances set, weights fitted by bench/routing.py --fit
UNCERTAIN = (0.12, 1.54)
FRAGMENTS = (0.01, 15.42)
FRAME = (1, 0.73)  # per side cut beyond the first
SEE_THROUGH = (0.0, 10.03)  # correlation of interior and backdrop rows
SLOPE = (0.15, 1.0)  # the interior follows the backdrop dimmed by a see-through subject
EDGE = (8.0, 1.66)  # penalised by log(allowance / ratio) below it
REASON_FLOOR = 0.05  # a penalty below this (score x 0.95) is not worth naming


@dataclass(frozen=True)
class Signals:
    area: float  # subject share of the frame
    uncertain: float  # uncertain alpha / subject area
    fragments: float  # subject outside the largest component / subject area
    pieces: int  # components of at least 0.5% of the subject
    sides: tuple[str, ...]  # frame sides the subject is cut by
    see_through: float | None = None  # interior rows following the backdrop's (0-1)
    edge: float | None = None  # gradient on the mask's edge / gradient in the ring beside it


@dataclass(frozen=True)
class Confidence:
    score: float  # 1: nothing suspicious; 0: surely wrong
    reasons: tuple[str, ...]  # what lowered it, most costly first
    signals: Signals


def _reduce(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if arr.shape[1::-1] == size:
        return arr
    mode = "L" if arr.ndim == 2 else "RGB"
    return np.asarray(Image.fromarray(arr, mode).resize(size, Image.Resampling.BOX))


def analysis_size(width: int, height: int) -> tuple[int, int]:
    k = max(1.0, max(width, height) / ANALYSIS_EDGE)
    return max(1, round(width / k)), max(1, round(height / k))


def _mask_signals(m: np.ndarray) -> Signals:
    from scipy import ndimage  # lazy, as in imaging.geometry

    subject = m >= SUBJECT
    n_subject = int(subject.sum())
    if n_subject == 0:
        return Signals(0.0, 0.0, 0.0, 0, ())
    labels, _ = ndimage.label(subject, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())[1:]
    edges = {"top": subject[0], "bottom": subject[-1], "left": subject[:, 0],
             "right": subject[:, -1]}
    return Signals(area=n_subject / m.size,
                   uncertain=float(((m > LOW) & (m < HIGH)).sum() / n_subject),
                   fragments=float(1.0 - sizes.max() / n_subject),
                   pieces=int((sizes >= 0.005 * n_subject).sum()),
                   sides=tuple(s for s, e in edges.items() if e.mean() >= SIDE_SHARE))


def _see_through(luma: np.ndarray, interior: np.ndarray, ring: np.ndarray, span: float) -> float:
    """How well the interior's row medians follow the backdrop ring's on the same rows,
    dimmed (a see-through subject): their correlation when the slope is in SLOPE, else 0."""
    rows = (interior.sum(axis=1) >= 3) & (ring.sum(axis=1) >= 3)
    if rows.sum() < 10:
        return 0.0
    inside = np.array([np.median(luma[y][interior[y]]) for y in np.flatnonzero(rows)])
    beside = np.array([np.median(luma[y][ring[y]]) for y in np.flatnonzero(rows)])
    if beside.std() <= 0.01 * span or inside.std() == 0:
        return 0.0
    slope = float(np.cov(inside, beside)[0, 1] / beside.var(ddof=1))
    if not SLOPE[0] < slope < SLOPE[1]:
        return 0.0
    return max(0.0, float(np.corrcoef(inside, beside)[0, 1]))


def _image_signals(m: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """(see_through, edge), the gradients relative to the image's luminance range
    (so exposure does not matter)."""
    from scipy import ndimage

    luma = rgb.astype(np.float32).mean(axis=2)
    lo, hi = np.percentile(luma, (1, 99))
    span = max(float(hi - lo), 1.0)
    grad = np.hypot(ndimage.sobel(luma, 0), ndimage.sobel(luma, 1)) / 8 / span
    subject = m >= SUBJECT
    interior = ndimage.binary_erosion(m >= HIGH, iterations=INTERIOR_PX)
    away = ndimage.distance_transform_edt(m <= LOW)
    ring = (away > RING_PX[0]) & (away <= RING_PX[1])
    outline = ndimage.binary_dilation(subject ^ ndimage.binary_erosion(subject))
    ring_grad = float(grad[ring].mean()) if ring.any() else 0.0
    edge = float(grad[outline].mean()) / (ring_grad + 0.002)
    return _see_through(luma, interior, ring, span), edge


def signals(mask: np.ndarray, rgb: np.ndarray | None = None) -> Signals:
    """The raw signals of ``mask`` (HxW uint8) and, if given, its image (HxWx3 uint8,
    any size: both are reduced to the analysis size)."""
    size = analysis_size(mask.shape[1], mask.shape[0])
    m = _reduce(np.ascontiguousarray(mask, dtype=np.uint8), size)
    s = _mask_signals(m)
    if rgb is None or s.area == 0:
        return s
    see, edge = _image_signals(m, _reduce(np.ascontiguousarray(rgb[..., :3]), size))
    return Signals(s.area, s.uncertain, s.fragments, s.pieces, s.sides, see, edge)


def _uncertain_reason(share: float) -> str:
    if share <= 1:
        return f"uncertain alpha over {share:.0%} of the subject's area"
    return f"uncertain alpha over {share:.1f}x the subject's area"  # a thin or faint subject


def excess(s: Signals) -> dict[str, float]:
    """Each signal past its allowance (0: no penalty), keyed by its reason."""
    e = {
        _uncertain_reason(s.uncertain):
            max(0.0, s.uncertain - UNCERTAIN[0]),
        f"{s.pieces} pieces; {s.fragments:.0%} of the subject outside the largest":
            max(0.0, s.fragments - FRAGMENTS[0]),
        f"subject cut by the frame ({', '.join(s.sides)})": max(0, len(s.sides) - FRAME[0]),
    }
    if s.edge is not None:
        e[f"backdrop shows through the subject ({s.see_through:.2f}): glass?"] = \
            max(0.0, s.see_through - SEE_THROUGH[0])
        e[f"mask edge off the image's edges ({s.edge:.1f})"] = \
            float(np.log(EDGE[0] / max(s.edge, 0.1))) if s.edge < EDGE[0] else 0.0
    return e


WEIGHTS = (UNCERTAIN[1], FRAGMENTS[1], FRAME[1], SEE_THROUGH[1], EDGE[1])


def score(mask: np.ndarray, rgb: np.ndarray | None = None) -> Confidence:
    """The confidence of ``mask`` (HxW uint8 alpha), judged with its image ``rgb`` when
    given (the image signals are skipped without it); deterministic."""
    s = signals(mask, rgb)
    if s.area < EMPTY_AREA:
        return Confidence(0.0, ("empty mask",), s)
    if s.area > FULL_AREA:
        return Confidence(0.0, ("everything is subject",), s)
    penalties = {r: w * x for (r, x), w in zip(excess(s).items(), WEIGHTS)}
    reasons = tuple(r for r, p in sorted(penalties.items(), key=lambda kv: -kv[1])
                    if p >= REASON_FLOOR)
    return Confidence(round(float(np.exp(-sum(penalties.values()))), 4), reasons, s)
