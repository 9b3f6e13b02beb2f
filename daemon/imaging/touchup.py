"""Touch-up: a retoucher's keep and remove brush strokes turned into a corrected alpha.

Strokes are in source pixels (after EXIF orientation): a mode, a radius and a path.
``apply`` paints them into the working-size mask (keep: 255, remove: 0), softens the
painted outline ``FEATHER`` working pixels each side so it becomes part of the
uncertain band, and
lets the pipeline's own refinement (``daemon.imaging.refine``) re-decide that band
from the full-size pixels: a stroke along a hair edge gives the edge the photo has,
not the brush's hard cut. Only pixels within the strokes' reach (the brush plus the
softening, ``REACH`` working pixels) take the new alpha; every other pixel keeps the
alpha it had, to the bit. The work is done on a crop around the strokes (with the
refinement's context), so the cost follows the strokes, not the photo.

Pure: numpy in, numpy out.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from daemon.imaging.keys import MASK_EDGE
from daemon.imaging.refine import FAR_RADIUS, refine

MODES = ("keep", "remove")
MAX_STROKES, MAX_POINTS = 500, 20_000  # per touch-up
MAX_RADIUS = 2000  # source px
FEATHER = 4  # working px each side of a brush's outline that the refinement re-decides
REACH = FEATHER + 1  # working px beyond the brush whose alpha may change
CONTEXT = FAR_RADIUS + 8  # working px of photo around the strokes the refinement reads


class StrokeError(ValueError):
    """Strokes that are not what the API takes (the message says which)."""


@dataclass(frozen=True)
class Stroke:
    mode: str  # keep | remove
    radius: float  # source px
    points: tuple[tuple[float, float], ...]  # (x, y) in source px


def parse_strokes(data) -> list[Stroke]:
    """``[{"mode": "keep"|"remove", "radius": R, "points": [[x, y], ...]}, ...]`` (JSON)."""
    if not isinstance(data, list) or not data:
        raise StrokeError("strokes: must be a non-empty list")
    if len(data) > MAX_STROKES:
        raise StrokeError(f"strokes: at most {MAX_STROKES} per touch-up")
    strokes, points = [], 0
    for i, s in enumerate(data):
        where = f"strokes[{i}]"
        if not isinstance(s, dict):
            raise StrokeError(f"{where}: must be an object")
        if s.get("mode") not in MODES:
            raise StrokeError(f"{where}.mode: must be keep or remove")
        radius = s.get("radius")
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) \
                or not 0.5 <= radius <= MAX_RADIUS:
            raise StrokeError(f"{where}.radius: must be a number from 0.5 to {MAX_RADIUS}")
        pts = s.get("points")
        if not isinstance(pts, list) or not pts:
            raise StrokeError(f"{where}.points: must be a non-empty list of [x, y]")
        for p in pts:
            if not (isinstance(p, list) and len(p) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    and abs(v) < 1e6 for v in p)):
                raise StrokeError(f"{where}.points: each must be [x, y] in source pixels")
        points += len(pts)
        strokes.append(Stroke(s["mode"], float(radius), tuple((float(x), float(y))
                                                                for x, y in pts)))
    if points > MAX_POINTS:
        raise StrokeError(f"strokes: at most {MAX_POINTS} points per touch-up")
    return strokes


def paint(strokes: list[Stroke], width: int, height: int, scale: float = 1.0,
          offset: tuple[float, float] = (0.0, 0.0), grow: float = 0.0) -> np.ndarray:
    """The strokes as labels (0: untouched, 1: keep, 2: remove; a later stroke over an
    earlier one wins) on a width x height grid whose pixel (0, 0) is source pixel
    ``offset`` and whose pixels are ``scale`` source pixels wide; ``grow`` widens every
    brush by that many grid pixels."""
    labels = np.zeros((height, width), np.uint8)
    shift = 4  # sub-pixel precision of OpenCV's drawing (1/16 px)
    for s in strokes:
        value = 1 if s.mode == "keep" else 2
        r = s.radius / scale + grow
        pts = np.array([[(x - offset[0]) / scale, (y - offset[1]) / scale] for x, y in s.points])
        fixed = np.round(pts * (1 << shift)).astype(np.int64)
        thick = max(1, int(round(2 * r)))
        for a, b in zip(fixed, fixed[1:] if len(fixed) > 1 else fixed):
            cv2.line(labels, tuple(map(int, a)), tuple(map(int, b)), value, thick,
                     cv2.LINE_8, shift)
        for p in (fixed[0], fixed[-1]):
            cv2.circle(labels, tuple(map(int, p)), int(round(r * (1 << shift))), value, -1,
                       cv2.LINE_8, shift)
    return labels


def bounds(strokes: list[Stroke], width: int, height: int, margin: float
           ) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the strokes plus ``margin`` source px, within the image; None
    when no stroke reaches the image."""
    xs = [x for s in strokes for x, _ in s.points]
    ys = [y for s in strokes for _, y in s.points]
    r = max(s.radius for s in strokes) + margin
    x0, y0 = max(0, int(min(xs) - r)), max(0, int(min(ys) - r))
    x1, y1 = min(width, int(np.ceil(max(xs) + r)) + 1), min(height, int(np.ceil(max(ys) + r)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def working_scale(width: int, height: int) -> float:
    """Source px per working-mask px (the pipeline's ``MASK_EDGE`` reduction)."""
    return max(1.0, max(width, height) / MASK_EDGE)


def apply(rgb: np.ndarray, alpha: np.ndarray, strokes: list[Stroke], mode: str = "edges"
          ) -> np.ndarray:
    """The corrected full-size alpha (a new array); ``alpha`` is the current one."""
    height, width = alpha.shape
    f = working_scale(width, height)
    box = bounds(strokes, width, height, (CONTEXT + REACH) * f)
    out = alpha.copy()
    if box is None:
        return out
    x0, y0, x1, y1 = box
    crop_rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    crop_alpha = alpha[y0:y1, x0:x1]
    w, h = max(1, round((x1 - x0) / f)), max(1, round((y1 - y0) / f))
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    work = cv2.resize(crop_alpha, (w, h), interpolation=cv2.INTER_AREA) if f > 1 \
        else crop_alpha.copy()
    labels = paint(strokes, w, h, scale=(sx + sy) / 2, offset=(x0, y0))
    work[labels == 1] = 255
    work[labels == 2] = 0
    # the painted outline softened FEATHER working px each side: uncertain, so the band
    # re-decides it from the photo's colours (the edge lands where the photo has it)
    soft = cv2.GaussianBlur(work, (2 * FEATHER + 1,) * 2, FEATHER / 2)
    kernel = np.ones((2 * FEATHER + 1,) * 2, np.uint8)
    painted = (labels > 0).astype(np.uint8)
    edge = cv2.dilate(painted, kernel) - cv2.erode(painted, kernel)
    work = np.where(edge > 0, soft, work)
    new = refine(crop_rgb, work, mode)
    reach = paint(strokes, x1 - x0, y1 - y0, offset=(x0, y0), grow=REACH * f) > 0
    out[y0:y1, x0:x1] = np.where(reach, new, crop_alpha)
    return out
