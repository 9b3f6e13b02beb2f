"""Despill: the subject's own colour in partly transparent pixels, not the backdrop's mix.

Where 0 < alpha < 1 the photo's pixel is a mix, ``I = alpha F + (1 - alpha) B``, of the
subject's colour ``F`` and the backdrop ``B`` behind it. Kept as is, a strand or an edge
at alpha 0.4 carries 60% of the sweep, a light halo over a dark page. Solved for ``F``
with ``B`` from the backdrop model (``daemon.imaging.backdrop``):

    F = B + (I - B) / alpha, clipped to the pixel range.

Composited over any colour ``K`` this gives back ``I + (1 - alpha) (K - B)``: exactly
the photo with its backdrop swapped for ``K``, whatever the error of alpha in ``F``;
what is left is ``(alpha - alpha_true) (B - K)`` and the model's own error.

On a backdrop that is not a plain sweep (a room, shelves, foliage; or no backdrop to
fit), the backdrop model is not what is behind an edge. There ``F`` and ``B`` come from
their neighbourhood instead: pymatting's ``estimate_foreground_ml`` (a multi-level
smooth-colour solver, a dependency of rembg's) on the photo reduced to about
``LOCAL_EDGE`` px, only on the ``TILE`` x ``TILE`` tiles that hold partial pixels (with a
``PAD`` margin), with ``LOCAL_ITERATIONS``. At full size each partial pixel then gets the
``F`` of the two-colour model nearest to those estimates that explains its own colour
exactly (``a F + (1 - a) B = I``):

    F = F0 - a r / (a^2 + (1 - a)^2),  r = a F0 + (1 - a) B0 - I,

so the photo's own detail is kept and the composite over the estimated ``B0`` is the
photo. Measured on the busy control scenes against the library at full size
(bench/detail.md): closer to the truth, at a fraction of its cost.

It works on the source's pixels (``Decoded.full``: its colour space, 8 or 16 bits), before
any colour conversion, and only on the partial pixels: a ``Patch`` of their indices and
new values, which the renderer writes into the copy it makes anyway (the cutout) or into
each PNG strip as it goes (daemon/imaging/deliver.py): the photo is never copied for it.
Per-pixel arithmetic and exact integer reductions, and the solver's serial loops: the bytes
do not depend on thread counts. Pure.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from daemon.imaging.backdrop import Backdrop, sample

CHUNK = 1 << 18  # pixels solved at once
LOW, HIGH = 2, 253  # alpha levels solved: at 1 or 254 the mix is < 1 level from the colour
LOCAL_EDGE = 750  # px: the long side (about) of the reduced photo the local estimate is made on
TILE, PAD = 64, 12  # reduced px: the tiles holding partial pixels, and their margin
LOCAL_ITERATIONS = {"n_big_iterations": 1, "n_small_iterations": 4}  # measured: no worse than
# the library's defaults (2, 10) on the busy control, at a third of the cost


@dataclass(frozen=True)
class Patch:
    """New colours for some pixels of an image ``width`` wide: the renderer writes them
    into its own copy (or PNG strip) of the pixels, so the photo is never copied."""

    flat: np.ndarray  # row-major indices of the pixels, ascending
    values: np.ndarray  # N x 3, the image's dtype: their subject colour
    width: int

    def cropped(self, box: tuple[int, int, int, int]) -> "Patch":
        """The patch of the image cropped to ``box`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        lo, hi = np.searchsorted(self.flat, (y0 * self.width, y1 * self.width))
        ys, xs = np.divmod(self.flat[lo:hi], self.width)
        keep = (xs >= x0) & (xs < x1)
        return Patch((ys[keep] - y0) * (x1 - x0) + xs[keep] - x0, self.values[lo:hi][keep],
                     x1 - x0)

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices from the start of row r0, values) of the pixels in rows r0..r1."""
        lo, hi = np.searchsorted(self.flat, (r0 * self.width, r1 * self.width))
        return self.flat[lo:hi] - r0 * self.width, self.values[lo:hi]

    def onto(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` (HxWxC, C >= 3, C-contiguous, this patch's size) patched in place."""
        pixels.reshape(-1, pixels.shape[-1])[self.flat, :3] = self.values
        return pixels


def foreground(full: np.ndarray, alpha: np.ndarray, backdrop: Backdrop | None) -> Patch | None:
    """The subject's colour at every pixel of ``full`` (HxWx3 uint8/uint16) whose ``alpha``
    (HxW uint8) is partial (``LOW``-``HIGH``); None where there is none. Behind the edge:
    the ``backdrop`` model on a plain sweep; elsewhere (a model of a busy scene is not it)
    estimated locally, from the photo around the edge)."""
    points = cv2.findNonZero(cv2.inRange(alpha, LOW, HIGH))
    if points is None:
        return None
    w = alpha.shape[1]
    points = points.reshape(-1, 2)  # (x, y) in row-major order: ascending indices
    flat = points[:, 1].astype(np.intp) * w + points[:, 0]
    del points
    top = 255.0 if full.dtype == np.uint8 else 65535.0
    if backdrop is None or not backdrop.plain:
        return Patch(flat, _local(full, alpha, flat, top), w)
    values = np.empty((len(flat), 3), full.dtype)
    for i in range(0, len(flat), CHUNK):  # bounded temporaries
        at = flat[i:i + CHUNK]
        ys, xs = np.divmod(at, w)
        pixel = full.reshape(-1, 3).take(at, axis=0).astype(np.float32)
        B = backdrop.at(xs, ys)
        B *= np.float32(top / 255)
        a = alpha.take(at).astype(np.float32) * np.float32(1 / 255)
        pixel -= B
        pixel /= a[:, None]
        pixel += B
        np.clip(np.rint(pixel, out=pixel), 0, top, out=pixel)
        values[i:i + CHUNK] = pixel
    return Patch(flat, values, w)


def _local(full: np.ndarray, alpha: np.ndarray, flat: np.ndarray, top: float) -> np.ndarray:
    """The subject's colour (N x 3, ``full``'s dtype) at the partial pixels ``flat``, from
    foreground and background colours estimated around them (module docstring)."""
    from pymatting import estimate_foreground_ml  # numba: imported on a busy photo's first edge

    h, w = alpha.shape
    k = max(1, min(-(-max(w, h) // LOCAL_EDGE), w, h))
    dw, dh = w // k, h // k
    ys, xs = np.divmod(flat, w)
    cx, cy = np.minimum(xs // k, dw - 1), np.minimum(ys // k, dh - 1)
    # the reduced box around the partial pixels (exact k x k area reductions)
    x0, y0 = max(int(cx.min()) - PAD, 0), max(int(cy.min()) - PAD, 0)
    x1, y1 = min(int(cx.max()) + PAD + 1, dw), min(int(cy.max()) + PAD + 1, dh)
    bw, bh = x1 - x0, y1 - y0
    img = cv2.resize(full[y0 * k:y1 * k, x0 * k:x1 * k], (bw, bh),
                     interpolation=cv2.INTER_AREA).astype(np.float64) / top
    a = cv2.resize(alpha[y0 * k:y1 * k, x0 * k:x1 * k], (bw, bh),
                   interpolation=cv2.INTER_AREA).astype(np.float64) / 255
    F = np.zeros((bh, bw, 3), np.float32)
    B = np.zeros((bh, bw, 3), np.float32)
    across = -(-bw // TILE)
    for t in np.unique(((cy - y0) // TILE) * across + (cx - x0) // TILE):
        r, c = divmod(int(t), across)
        ty0, tx0 = r * TILE, c * TILE
        ty1, tx1 = min(ty0 + TILE, bh), min(tx0 + TILE, bw)
        py0, px0 = max(ty0 - PAD, 0), max(tx0 - PAD, 0)
        f, b = estimate_foreground_ml(img[py0:min(ty1 + PAD, bh), px0:min(tx1 + PAD, bw)],
                                      a[py0:min(ty1 + PAD, bh), px0:min(tx1 + PAD, bw)],
                                      return_background=True, **LOCAL_ITERATIONS)
        F[ty0:ty1, tx0:tx1] = f[ty0 - py0:ty1 - py0, tx0 - px0:tx1 - px0]
        B[ty0:ty1, tx0:tx1] = b[ty0 - py0:ty1 - py0, tx0 - px0:tx1 - px0]
    del img, a
    values = np.empty((len(flat), 3), full.dtype)
    for i in range(0, len(flat), CHUNK):  # bounded temporaries
        at = slice(i, i + CHUNK)
        f0 = sample(F, xs[at] - x0 * k, ys[at] - y0 * k, (bw * k, bh * k))
        b0 = sample(B, xs[at] - x0 * k, ys[at] - y0 * k, (bw * k, bh * k))
        pixel = full.reshape(-1, 3).take(flat[at], axis=0).astype(np.float32) * np.float32(1 / top)
        s = alpha.take(flat[at]).astype(np.float32)[:, None] * np.float32(1 / 255)
        r = s * f0 + (1 - s) * b0 - pixel
        f0 -= s * r / (s * s + (1 - s) * (1 - s))
        f0 *= np.float32(top)
        np.clip(np.rint(f0, out=f0), 0, top, out=f0)
        values[at] = f0
    return values
