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
   backdrop model already (it varies over hundreds of pixels), seams and paper texture
   stay under the threshold;
3. at full size, on the pixels of those cells (grown by one cell): the alpha of a
   two-colour model whose ends are the backdrop ``B`` and the structure's own colour,
   taken as the strongest departure within ``REACH`` px (a strand's covered core):
   ``alpha = (|I - B| - floor) / (max_near |I - B| - floor)``, ``floor`` being
   ``FLOOR_SIGMAS`` times the full-size noise;
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


def recover(rgb: np.ndarray, mask: np.ndarray, alpha: np.ndarray,
            backdrop: Backdrop | None) -> np.ndarray:
    """``alpha`` (full-size uint8, refined) with the detail attached to the subject, in
    place; unchanged where the backdrop is not a plain sweep."""
    if backdrop is None or not backdrop.plain:
        return alpha
    h, w = rgb.shape[:2]
    k, small = backdrop.k, backdrop.reduced
    dh, dw = small.shape[:2]
    dev = np.abs(small.astype(np.float32) - backdrop.over_reduced()).max(axis=2)
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
    d = np.abs(pixel - B).max(axis=1)
    # the structure's own strength: the strongest departure within REACH px, on a window
    y0, x0 = int(Y.min()), int(X.min())
    win = np.zeros((int(Y.max()) - y0 + 1, int(X.max()) - x0 + 1), np.uint8)
    win[Y - y0, X - x0] = np.minimum(d, 255).astype(np.uint8)
    near = cv2.dilate(win, np.ones((2 * REACH + 1,) * 2, np.uint8))[Y - y0, X - x0]
    floor = FLOOR_SIGMAS * backdrop.noise
    a = (d - floor) / np.maximum(near.astype(np.float32) - floor, 1.0)
    new = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
    old = alpha.take(flat)
    np.put(alpha, flat, np.maximum(old, new))
    return alpha
