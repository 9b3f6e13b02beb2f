"""The detail stage: thin structures attached to the subject, recovered from the full-size photo.

U^2-Net sees 320x320: a 40 px strap at 24 MP is 2 px there, a strand a tenth of a pixel,
so the model's mask (and ``refine``, which only re-decides the band around it) misses
straps, cords, chains and strands. On a studio sweep they are still plain to see: they
depart from the backdrop (``daemon.imaging.backdrop``) beyond its noise. This stage:

1. on the photo area-reduced by an integer ``k`` (long side about 1536 px, the backdrop
   model's ``reduced``): the pixels departing from the backdrop model by more than
   ``THRESHOLD_SIGMAS`` times the grid's noise (at least ``THRESHOLD_MIN`` levels);
2. keeps those connected (8-neighbours) to the subject (working mask >= ``SEED``):
   dust and specks lying apart from it stay out; a floor shadow is part of the
   backdrop model already (it varies over hundreds of pixels), and where the model
   follows it imperfectly (at the subject's base) a pixel that is the backdrop's own
   colour at most ``SHADOW_DEPTH`` darker is not a departure; seams and paper texture
   stay under the threshold;
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
FLOOR_SIGMAS = 2.5  # full-size noise floor under the departure
REACH = 4  # px: a structure's own colour is its strongest departure this near
SHADOW_COS, SHADOW_DEPTH = 0.998, 0.08  # the backdrop's own colour, at most this much darker


def recover(rgb: np.ndarray, mask: np.ndarray, alpha: np.ndarray,
            backdrop: Backdrop | None) -> np.ndarray:
    """``alpha`` (full-size uint8, refined) with the detail attached to the subject, in
    place; unchanged where the backdrop is not a plain sweep."""
    if backdrop is None or not backdrop.plain:
        return alpha
    h, w = rgb.shape[:2]
    k, small = backdrop.k, backdrop.reduced
    dh, dw = small.shape[:2]
    model = backdrop.over_reduced()
    dev = np.abs(small.astype(np.float32) - model).max(axis=2)
    dev[_shadowlike(small.reshape(-1, 3), model.reshape(-1, 3)).reshape(dh, dw)] = 0
    m = cv2.resize(mask, (dw, dh), interpolation=cv2.INTER_AREA)
    seed = m >= SEED
    # the grid's noise: the robust spread of the departure on the backdrop far from the subject
    far = m == 0
    sample = dev[far][::7]
    sigma = 1.4826 * float(np.median(sample)) if sample.size else 1.0
    threshold = max(THRESHOLD_SIGMAS * sigma, THRESHOLD_MIN)
    cand = (dev > threshold) & ~seed
    if not cand.any():
        return alpha
    union = (cand | seed).astype(np.uint8)
    n, labels = cv2.connectedComponents(union, connectivity=8)
    attached = np.zeros(n, bool)
    attached[np.unique(labels[seed])] = True
    attached[0] = False
    found = (attached[labels] & cand).astype(np.uint8)
    if not found.any():
        return alpha
    found = cv2.dilate(found, np.ones((3, 3), np.uint8))
    # full-size pixels of the found cells
    cy, cx = np.nonzero(found)
    oy, ox = np.divmod(np.arange(k * k), k)
    Y = (cy[:, None] * k + oy[None, :]).ravel()
    X = (cx[:, None] * k + ox[None, :]).ravel()
    flat = Y.astype(np.intp) * w + X
    pixel = rgb.reshape(-1, 3).take(flat, axis=0).astype(np.float32)
    B = backdrop.at(X, Y)
    e = np.rint(pixel - B).astype(np.int16)  # the departure, per channel
    e[_shadowlike(pixel, B)] = 0
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
    # alpha: the departure's projection on S, above the noise floor
    reach = np.sqrt(np.einsum("ij,ij->i", S, S))
    along = np.einsum("ij,ij->i", e.astype(np.float32), S) / np.maximum(reach, 1.0)
    floor = FLOOR_SIGMAS * backdrop.noise
    a = (along - floor) / np.maximum(reach - floor, 1.0)
    new = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
    old = alpha.take(flat)
    np.put(alpha, flat, np.maximum(old, new))
    return alpha


def _shadowlike(pixel: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Which pixels (N x 3) are the backdrop ``B`` (N x 3) darkened a little with its own
    colour: a floor shadow's edge the model follows imperfectly, not a structure (a black
    cord on a white sweep is that colour too, but far darker)."""
    pixel = pixel.astype(np.float32)
    ii = np.einsum("ij,ij->i", pixel, pixel)
    bb = np.einsum("ij,ij->i", B, B)
    ib = np.einsum("ij,ij->i", pixel, B)
    # cos(I, B) >= SHADOW_COS and 1 - SHADOW_DEPTH <= |I| / |B| <= 1, without square roots
    return ((ib >= 0) & (ib * ib >= SHADOW_COS ** 2 * ii * bb) & (ii <= bb)
            & (ii >= (1 - SHADOW_DEPTH) ** 2 * bb))
