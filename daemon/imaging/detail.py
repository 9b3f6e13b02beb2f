"""The detail stage: thin structures attached to the subject, recovered from the full-size photo.

U^2-Net sees 320x320: a 40 px strap at 24 MP is 2 px there, a strand a tenth of a pixel,
so the model's mask (and ``refine``, which only re-decides the band around it) misses
straps, cords, chains and strands. On a studio sweep they are still plain to see: they
depart from the backdrop (``daemon.imaging.backdrop``) beyond its noise. This stage:

1. on the photo area-reduced by an integer ``k`` (long side about 1536 px, the backdrop
   model's ``reduced``): the pixels departing from the backdrop model by more than
   ``THRESHOLD_SIGMAS`` times the grid's noise (at least ``THRESHOLD_MIN`` levels).
   Not a departure: a broad area (it survives an opening of radius ``BROAD``) of the
   backdrop's own colour at most ``SHADOW_DEPTH`` darker or ``GLOW`` lighter, where the
   model follows a floor shadow imperfectly: at the subject's base, the model is filled
   in from farther out, so where the shadow darkens away from the subject the sweep
   right beside it is lighter than the model (a rounded base in its shadow: a crescent
   that would otherwise read as a structure); a reflection on the sweep is that too. A
   thin chain of the sweep's hue still departs. Seams and paper texture stay under the
   threshold;
2. of those, the structures: within ``SHARP_REACH`` px of a sharp change of the
   departure (its range over 3 x 3 at least ``SHARP`` of its max: structures have
   edges, a smooth ramp has none), connected (8-neighbours) to the subject (working
   mask >= ``SEED``): dust and specks lying apart stay out; and each connected part
   either reaching out of the subject's edge zone (``EDGE_ZONE`` px, or ``ZONE_BANDS``
   widths of the model's own soft band where that is wider) or thin (no thicker than
   ``2 THIN`` px: a strand's stub). A soft edge, feathered or defocused, departs from
   the backdrop too, but it is broad and stays within the zone (the model sees a soft
   edge as soft: its band is as wide): it is refine's;
3. at full size, on the pixels of those cells (grown by one cell): the alpha of a
   two-colour model whose ends are the backdrop ``B`` and the structure's own colour
   ``B + S``, ``S`` the strongest departure within ``REACH`` px (a strand's covered
   core; per channel, max or min): ``alpha = (e.S/|S| - floor) / (|S| - floor)`` with
   ``e = I - B``, ``floor`` being ``FLOOR_SIGMAS`` times the full-size noise. The
   projection keeps out the backdrop between dense strands, which departs the other way
   where the fringe darkens the model;
4. alpha only ever rises: ``max(refined, detail)``.

On a busy backdrop (not ``plain``) it does nothing: departures from a model of a room
are everywhere, and the mask is trusted as it is.

Exact integer reductions, per-pixel float arithmetic and 8-bit morphology: the bytes do
not depend on OpenCV's thread count. Pure: numpy in, numpy out.
"""
from __future__ import annotations

import cv2
import numpy as np

from daemon.imaging.backdrop import Backdrop

THRESHOLD_SIGMAS = 6.0  # departure at the detection grid, in units of its noise
THRESHOLD_MIN = 4.0  # grey levels, at least (seams, paper texture, the model's own error)
SEED = 128  # working-mask level of the subject the detail must connect to
EDGE_ZONE = 40  # px at 24 MP (in proportion to the frame): the subject's edge zone
ZONE_BANDS = 2.0  # ... or this many widths of the model's own soft band, if wider
THIN = 12  # px at 24 MP: a part within the zone no thicker than twice this is kept
SHARP = 0.5  # a sharp change: the departure's range over 3 x 3 is this share of its max
SHARP_REACH = 32  # px at 24 MP: a structure's pixels lie this near a sharp change
FLOOR_SIGMAS = 2.5  # full-size noise floor under the departure
REACH = 4  # px: a structure's own colour is its strongest departure this near
SHADOW_COS, SHADOW_DEPTH = 0.998, 0.08  # the backdrop's own colour, at most this much darker
GLOW = 0.08  # ... or lighter: a reflection, or the model's lag on a shadow's slope
BROAD = 2  # reduced px: a shadow-like area survives an opening of this radius (thin ones do not)


def recover(rgb: np.ndarray, mask: np.ndarray, alpha: np.ndarray,
            backdrop: Backdrop | None) -> np.ndarray:
    """``alpha`` (full-size uint8, refined) with the detail attached to the subject, in
    place; unchanged where the backdrop is not a plain sweep."""
    if backdrop is None or not backdrop.plain:
        return alpha
    dev, shade = _departures(backdrop)
    found = _structures(dev, mask, rgb.shape[1], rgb.shape[0], backdrop.k)
    if found is None:
        return alpha
    flat, new = _alpha(rgb, backdrop, found, shade)
    np.put(alpha, flat, np.maximum(alpha.take(flat), new))
    return alpha


def _departures(backdrop: Backdrop) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of the reduced photo: its departure from the model (the largest channel's,
    grey levels; 0 in broad shadow-like areas) and those areas (bool)."""
    small = backdrop.reduced
    dh, dw = small.shape[:2]
    model = backdrop.over_reduced()
    diff = small.astype(np.float32)
    np.subtract(diff, model, out=diff)
    np.abs(diff, out=diff)
    dev = np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])  # ~10x max(axis=2)
    del diff
    # shadow-like, where the departure is not negligible (half the least threshold)
    some = np.flatnonzero(dev > THRESHOLD_MIN / 2)
    shade = np.zeros((dh, dw), np.uint8)
    shade.reshape(-1)[some[_shadowlike(small.reshape(-1, 3).take(some, axis=0),
                                       model.reshape(-1, 3).take(some, axis=0))]] = 1
    del model
    # broad only: thin structures of the sweep's hue do not survive the opening
    shade = cv2.morphologyEx(shade, cv2.MORPH_OPEN, np.ones((2 * BROAD + 1,) * 2, np.uint8)) > 0
    dev[shade] = 0
    return dev, shade


def _structures(dev: np.ndarray, mask: np.ndarray, w: int, h: int, k: int) -> np.ndarray | None:
    """The reduced pixels (uint8 0/1, grown by one) of the structures attached to the
    subject, or None."""
    dh, dw = dev.shape
    per_px = max(w, h) / 6000 / k  # reduced px per full-size px at 24 MP
    m = cv2.resize(mask, (dw, dh), interpolation=cv2.INTER_AREA)
    seed = m >= SEED
    # the grid's noise: the robust spread of the departure on the backdrop far from the subject
    sample = dev[m == 0][::7]
    sigma = 1.4826 * float(np.median(sample)) if sample.size else 1.0
    cand = (dev > max(THRESHOLD_SIGMAS * sigma, THRESHOLD_MIN)) & ~seed
    if not cand.any():
        return None
    # near a sharp change of the departure: structures have edges, a smooth ramp has none
    square = np.ones((3, 3), np.uint8)
    hi = cv2.dilate(dev, square)
    sharp = cand & (hi - cv2.erode(dev, square) >= SHARP * hi)
    near = max(1, round(SHARP_REACH * per_px))
    cand &= cv2.dilate(sharp.astype(np.uint8), np.ones((2 * near + 1,) * 2, np.uint8)) > 0
    # attached: connected to the subject
    n, labels = cv2.connectedComponents((cand | seed).astype(np.uint8), connectivity=8)
    attached = np.zeros(n, bool)
    attached[np.unique(labels[seed])] = True
    attached[0] = False
    found = (attached[labels] & cand).astype(np.uint8)
    # each part reaching out of the subject's edge zone, or thin
    zone_px = max(EDGE_ZONE * max(w, h) / 6000, ZONE_BANDS * _band(mask) * w / mask.shape[1])
    radius = max(1, round(zone_px / k))
    # within ``radius`` of the subject (a distance transform: ~10x an elliptic dilation)
    zone = (cv2.distanceTransform((~seed).astype(np.uint8), cv2.DIST_L2, 3) <= radius
            ).astype(np.uint8)
    n, parts = cv2.connectedComponents(found, connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(parts[(found & (1 - zone)) > 0])] = True
    inside = found > 0
    depth = np.zeros(n, np.float32)
    np.maximum.at(depth, parts[inside], cv2.distanceTransform(found, cv2.DIST_L2, 3)[inside])
    keep |= depth <= THIN * per_px
    keep[0] = False
    if not keep.any():
        return None
    return cv2.dilate(keep[parts].astype(np.uint8), square)


def _alpha(rgb: np.ndarray, backdrop: Backdrop, found: np.ndarray, shade: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """(row-major indices, alpha uint8) of the full-size pixels of the ``found`` cells."""
    k, w = backdrop.k, rgb.shape[1]
    dw = found.shape[1]
    cy, cx = np.nonzero(found)
    oy, ox = np.divmod(np.arange(k * k), k)
    Y = (cy[:, None] * k + oy[None, :]).ravel()
    X = (cx[:, None] * k + ox[None, :]).ravel()
    flat = Y.astype(np.intp) * w + X
    pixel = rgb.reshape(-1, 3).take(flat, axis=0).astype(np.float32)
    B = backdrop.at(X, Y)
    e = np.rint(pixel - B).astype(np.int16)  # the departure, per channel
    e[_shadowlike(pixel, B) & shade.reshape(-1).take((Y // k) * dw + X // k)] = 0
    del pixel, B
    # the structure's own departure S: per channel the strongest within REACH px (max or
    # min, whichever is farther from 0), on a window over the found pixels
    y0, x0 = int(Y.min()), int(X.min())
    win = np.zeros((int(Y.max()) - y0 + 1, int(X.max()) - x0 + 1), np.int16)
    kernel = np.ones((2 * REACH + 1,) * 2, np.uint8)
    S = np.empty(e.shape, np.float32)
    for c in range(3):
        win[Y - y0, X - x0] = e[:, c]
        hi = cv2.dilate(win, kernel)[Y - y0, X - x0]
        lo = cv2.erode(win, kernel)[Y - y0, X - x0]
        S[:, c] = np.where(hi >= -lo, hi, lo)
    # the departure's projection on S, above the noise floor
    strength = np.sqrt(np.einsum("ij,ij->i", S, S))
    along = np.einsum("ij,ij->i", e.astype(np.float32), S) / np.maximum(strength, 1.0)
    floor = FLOOR_SIGMAS * backdrop.noise
    a = (along - floor) / np.maximum(strength - floor, 1.0)
    return flat, np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)


def _shadowlike(pixel: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Which pixels (N x 3) are the backdrop ``B`` (N x 3) darkened a little with its own
    colour: a floor shadow's edge the model follows imperfectly, not a structure (a black
    cord on a white sweep is that colour too, but far darker)."""
    pixel = pixel.astype(np.float32, copy=False)
    p0, p1, p2 = pixel[:, 0], pixel[:, 1], pixel[:, 2]
    b0, b1, b2 = B[:, 0], B[:, 1], B[:, 2]
    ii = p0 * p0 + p1 * p1 + p2 * p2
    bb = b0 * b0 + b1 * b1 + b2 * b2
    ib = p0 * b0 + p1 * b1 + p2 * b2
    # cos(I, B) >= SHADOW_COS and 1 - SHADOW_DEPTH <= |I| / |B| <= 1 + GLOW, without roots
    return ((ib >= 0) & (ib * ib >= SHADOW_COS ** 2 * ii * bb) & (ii <= (1 + GLOW) ** 2 * bb)
            & (ii >= (1 - SHADOW_DEPTH) ** 2 * bb))


def _band(mask: np.ndarray) -> float:
    """The width (working px) of the model's soft band: its partial pixels per pixel of
    the subject's outline."""
    subject = (mask >= SEED).astype(np.uint8)
    outline = int(subject.sum()) - int(cv2.erode(subject, np.ones((3, 3), np.uint8)).sum())
    partial = int(np.count_nonzero((mask > 8) & (mask < 247)))
    return partial / outline if outline else 0.0
