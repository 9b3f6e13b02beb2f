"""Despill: the subject's own colour in partly transparent pixels, not the backdrop's mix.

Where 0 < alpha < 1 the photo's pixel is a mix, ``I = alpha F + (1 - alpha) B``, of the
subject's colour ``F`` and the backdrop ``B`` behind it. Kept as is, a strand or an edge
at alpha 0.4 carries 60% of the sweep, a light halo over a dark page.

On a plain sweep, ``B`` is the backdrop model's (``daemon.imaging.backdrop``) and

    F = B + (I - B) / alpha, clipped to the pixel range.

Composited over any colour ``K`` this gives back ``I + (1 - alpha) (K - B)``: exactly
the photo with its backdrop swapped for ``K``, whatever the error of alpha in ``F``;
what is left is ``(alpha - alpha_true) (B - K)`` and the model's own error.

On a busy backdrop (or none fitted) no model says what is behind the edge: both colours
are estimated around it (``F0``, ``B0``: daemon/imaging/surround.py) and the pixel gets
the pair nearest them that explains it exactly, per channel (least squares on
``|F - F0|^2 + |B - B0|^2`` with ``alpha F + (1 - alpha) B = I``):

    F = F0 + alpha r / (alpha^2 + (1 - alpha)^2),  r = I - alpha F0 - (1 - alpha) B0,

which stays near ``F0`` where alpha is small (no division by it) and near ``I`` where
alpha is near 1.

It works on the source's pixels (``Decoded.full``: its colour space, 8 or 16 bits), before
any colour conversion, and only on the partial pixels: a ``Patch`` of their indices and
new values, which the renderer writes into the copy it makes anyway (the cutout) or into
each PNG strip as it goes (daemon/imaging/deliver.py): the photo is never copied for it.
Per-pixel arithmetic and integer box sums: the bytes do not depend on thread counts. Pure.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from daemon.imaging import surround
from daemon.imaging.backdrop import Backdrop

CHUNK = 1 << 18  # pixels solved at once
LOW, HIGH = 2, 253  # alpha levels solved: at 1 or 254 the mix is < 1 level from the colour


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
    (HxW uint8) is partial (``LOW``-``HIGH``); None where there is none. ``backdrop``: the
    photo's backdrop model; its ``B`` is used where it is a plain sweep, else the colours
    around the edge."""
    partial = cv2.inRange(alpha, LOW, HIGH)
    points = cv2.findNonZero(partial)
    if points is None:
        return None
    w = alpha.shape[1]
    points = points.reshape(-1, 2)  # (x, y) in row-major order: ascending indices
    flat = points[:, 1].astype(np.intp) * w + points[:, 0]
    del points
    top = 255.0 if full.dtype == np.uint8 else 65535.0
    solve = _over_sweep(backdrop, top) if backdrop is not None and backdrop.plain \
        else _around_edge(surround.estimate(full, alpha, partial))
    del partial
    values = np.empty((len(flat), 3), full.dtype)
    for i in range(0, len(flat), CHUNK):  # bounded temporaries
        at = flat[i:i + CHUNK]
        ys, xs = np.divmod(at, w)
        pixel = full.reshape(-1, 3).take(at, axis=0).astype(np.float32)
        a = alpha.take(at).astype(np.float32) * np.float32(1 / 255)
        pixel = solve(pixel, a[:, None], xs, ys)
        np.clip(np.rint(pixel, out=pixel), 0, top, out=pixel)
        values[i:i + CHUNK] = pixel
    return Patch(flat, values, w)


def _over_sweep(backdrop: Backdrop, top: float):
    """F = B + (I - B) / alpha, B the sweep's model (in place on the pixels ``I``)."""
    def solve(pixel, a, xs, ys):
        B = backdrop.at(xs, ys)
        B *= np.float32(top / 255)
        pixel -= B
        pixel /= a
        pixel += B
        return pixel
    return solve


def _around_edge(around: surround.Surround):
    """The pair (F, B) nearest (F0, B0) that explains the pixel exactly: its F."""
    def solve(pixel, a, xs, ys):
        F0, B0 = around.at(xs, ys)
        b = 1 - a
        pixel -= a * F0
        pixel -= b * B0  # r: what (F0, B0) leave unexplained
        pixel *= a / (a * a + b * b)
        pixel += F0
        return pixel
    return solve
