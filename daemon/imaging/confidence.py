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
- ``low contrast`` (needs the image): the median colour of the subject's
  interior against the backdrop around it, relative to the image's range:
  glass (the backdrop shows through), white on white;
- ``busy backdrop`` (needs the image): texture in the backdrop away from the
  subject: not a studio sweep, where the model takes backdrop for subject.

An empty mask, or one that is all subject, scores 0. The weights and allowances
were set on ``bench/routing.py``'s scenes; the routing threshold it chose is the
default of a pair's ``review.min_confidence`` (``bench/routing.md``).
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

# (allowance, weight) per signal: calibrated by bench/routing.py, see bench/routing.md
UNCERTAIN = (0.12, 4.0)
FRAGMENTS = (0.01, 8.0)
FRAME = (1, 0.7)  # per side cut beyond the first
CONTRAST = (0.5, 5.0)  # penalised below the allowance
CLUTTER = (0.006, 60.0)
REASON_FLOOR = 0.05  # a penalty below this (score x 0.95) is not worth naming


@dataclass(frozen=True)
class Signals:
    area: float  # subject share of the frame
    uncertain: float  # uncertain alpha / subject area
    fragments: float  # subject outside the largest component / subject area
    pieces: int  # components of at least 0.5% of the subject
    sides: tuple[str, ...]  # frame sides the subject is cut by
    contrast: float | None = None  # subject interior vs surrounding backdrop / image range
    clutter: float | None = None  # mean gradient of the far backdrop / image range


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


def _image_signals(m: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """(contrast, clutter): how far the subject's colour is from the backdrop around it,
    and the backdrop's texture away from the subject, both relative to the image's
    luminance range (so exposure does not matter)."""
    from scipy import ndimage

    rgb = rgb.astype(np.float32)
    luma = rgb.mean(axis=2)
    lo, hi = np.percentile(luma, (1, 99))
    span = max(float(hi - lo), 1.0)
    interior = ndimage.binary_erosion(m >= HIGH, iterations=INTERIOR_PX)
    backdrop = m <= LOW
    away = ndimage.distance_transform_edt(backdrop)
    ring = (away > RING_PX[0]) & (away <= RING_PX[1])
    contrast = 1.0  # too thin to judge: no penalty
    if interior.sum() >= 20 and ring.sum() >= 20:
        step = np.median(rgb[interior], axis=0) - np.median(rgb[ring], axis=0)
        contrast = float(np.linalg.norm(step)) / span
    far = away > RING_PX[0]
    clutter = 0.0
    if far.any():
        grad = np.hypot(ndimage.sobel(luma, 0), ndimage.sobel(luma, 1)) / 8
        clutter = float(grad[far].mean()) / span
    return contrast, clutter


def signals(mask: np.ndarray, rgb: np.ndarray | None = None) -> Signals:
    """The raw signals of ``mask`` (HxW uint8) and, if given, its image (HxWx3 uint8,
    any size: both are reduced to the analysis size)."""
    size = analysis_size(mask.shape[1], mask.shape[0])
    m = _reduce(np.ascontiguousarray(mask, dtype=np.uint8), size)
    s = _mask_signals(m)
    if rgb is None or s.area == 0:
        return s
    contrast, clutter = _image_signals(m, _reduce(np.ascontiguousarray(rgb[..., :3]), size))
    return Signals(s.area, s.uncertain, s.fragments, s.pieces, s.sides, contrast, clutter)


def _penalties(s: Signals) -> dict[str, float]:
    p = {
        f"uncertain alpha over {s.uncertain:.0%} of the subject's area":
            UNCERTAIN[1] * max(0.0, s.uncertain - UNCERTAIN[0]),
        f"{s.pieces} pieces; {s.fragments:.0%} of the subject outside the largest":
            FRAGMENTS[1] * max(0.0, s.fragments - FRAGMENTS[0]),
        f"subject cut by the frame ({', '.join(s.sides)})":
            FRAME[1] * max(0, len(s.sides) - FRAME[0]),
    }
    if s.contrast is not None:
        p[f"subject close to its backdrop in colour ({s.contrast:.2f})"] = \
            CONTRAST[1] * max(0.0, CONTRAST[0] - s.contrast)
        p[f"busy backdrop ({s.clutter:.3f})"] = CLUTTER[1] * max(0.0, s.clutter - CLUTTER[0])
    return p


def score(mask: np.ndarray, rgb: np.ndarray | None = None) -> Confidence:
    """The confidence of ``mask`` (HxW uint8 alpha), judged with its image ``rgb`` when
    given (the image signals are skipped without it); deterministic."""
    s = signals(mask, rgb)
    if s.area < EMPTY_AREA:
        return Confidence(0.0, ("empty mask",), s)
    if s.area > FULL_AREA:
        return Confidence(0.0, ("everything is subject",), s)
    penalties = _penalties(s)
    reasons = tuple(r for r, p in sorted(penalties.items(), key=lambda kv: -kv[1])
                    if p >= REASON_FLOOR)
    return Confidence(round(float(np.exp(-sum(penalties.values()))), 4), reasons, s)
