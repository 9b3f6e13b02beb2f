"""The backdrop model: what is behind the subject, fitted on the sure backdrop of the photo.

Studio photos are shot on a sweep: a backdrop that varies smoothly, plus sensor noise.
The model is that sweep on a coarse grid (long side about ``GRID`` cells):

- the photo is area-reduced to the grid; cells the working mask calls subject (or
  near it) are filled from the backdrop around them (normalised box sums, wider and
  wider until every cell is known);
- a median over ``MEDIAN`` x ``MEDIAN`` cells (about 150 px at 24 MP) then removes
  what is thin against it: straps, cords, chains, strands, specks that the model
  missed stay out of the backdrop, while a broad floor shadow, which varies over
  hundreds of pixels, is followed and so becomes part of the backdrop;
- the noise: the backdrop's robust spread around the model, from full-size samples
  (for the detail stage's floor) and at the grid (for the plainness test);
- ``plain``: the backdrop is a sweep, not a busy scene (shelves, foliage, a room),
  when its cells sit within ``BUSY_LEVELS`` of the model. The detail stage only acts
  on a plain backdrop.

Exact integer reductions and per-pixel operations (area resize, integer box sums,
median of uint8, bilinear sampling), so the result never depends on OpenCV's thread
count. Pure: numpy in, numpy out.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DETECT = 1536  # px: the reduced photo's long side (at most): a k x k area reduction
MIN_K = 2  # ... of at least 2 x 2 (a 1 MP photo: a quarter of the work)
GRID = 384  # cells on the long side
MEDIAN = 9  # cells: the median's window (thin structures cover less than half of it)
BG_SURE = 8  # working-mask level at or below which a pixel is backdrop
FILL_RADII = (1, 2, 4, 8, 16, 32, 64)  # cells: the subject is filled from the nearest backdrop
PRE_MEDIAN = 5  # reduced px: the median each cell's mean is taken over (strands out)
BUSY_LEVELS = 2.0  # grey levels: the robust spread of grid cells around the model, at most
REMAP_ROW = 4096  # points per row of the sampling maps (remap wants each side < 32767)


@dataclass(frozen=True)
class Backdrop:
    grid: np.ndarray  # gh x gw x 3 float32, grey levels 0-255 (8-bit scale)
    size: tuple[int, int]  # the photo's (width, height)
    reduced: np.ndarray  # the photo's first (h // k) * k rows and (w // k) * k columns, area-reduced
    k: int  # full-size px per reduced px
    noise: float  # full-size per-channel noise sigma around the model, grey levels
    spread: float  # the grid cells' robust spread around the model, grey levels
    plain: bool  # a smooth sweep, not a busy scene

    def at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The backdrop (N x 3 float32, 0-255) at full-size pixels (xs, ys), bilinear."""
        return sample(self.grid, xs, ys, self.covered)

    @property
    def covered(self) -> tuple[int, int]:
        """(width, height) of the photo's part the grid covers (the reduction drops the last
        w % k columns and h % k rows; the model extends over them unchanged)."""
        return self.reduced.shape[1] * self.k, self.reduced.shape[0] * self.k

    def over_reduced(self) -> np.ndarray:
        """The model at each pixel of ``reduced`` (HxWx3 float32), bilinear."""
        dh, dw = self.reduced.shape[:2]
        gh, gw = self.grid.shape[:2]
        return cv2.resize(self.grid, (dw, dh), interpolation=cv2.INTER_LINEAR) \
            if (gh, gw) != (dh, dw) else self.grid


def sample(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray, covered: tuple[int, int]
           ) -> np.ndarray:
    """``grid`` (gh x gw x 3 float32) spread over ``covered`` (width, height) full-size px,
    at full-size pixels (xs, ys): N x 3 float32, bilinear (cv2.resize's convention: the
    centre of pixel X sits at grid (X + 0.5) * gw / w - 0.5)."""
    gh, gw = grid.shape[:2]
    w, h = covered
    n = len(xs)
    rows = max(-(-n // REMAP_ROW), 1)
    at = np.zeros((2, rows * REMAP_ROW), np.float32)
    at[0, :n] = (xs + 0.5) * (gw / w) - 0.5
    at[1, :n] = (ys + 0.5) * (gh / h) - 0.5
    at = at.reshape(2, rows, REMAP_ROW)
    out = cv2.remap(grid, at[0], at[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * REMAP_ROW, 3)[:n]


def fit(rgb: np.ndarray, mask: np.ndarray) -> Backdrop | None:
    """The backdrop of ``rgb`` (HxWx3 uint8) behind the working-size ``mask``; None where
    there is too little backdrop to fit (the subject fills the frame)."""
    h, w = rgb.shape[:2]
    k = max(MIN_K, -(-max(w, h) // DETECT))
    dw, dh = w // k, h // k
    if dw < 8 or dh < 8:
        return None
    # one pass over the photo: an exact k x k area reduction (integer sums), then the grid
    reduced = cv2.resize(rgb[:dh * k, :dw * k], (dw, dh), interpolation=cv2.INTER_AREA)
    kg = max(1, -(-max(dw, dh) // GRID))
    gw, gh = -(-dw // kg), -(-dh // kg)
    # the cells: means of a small median of the reduced photo, so that a dense fringe of
    # strands (a texture at the cells' scale) does not darken them
    small = cv2.resize(cv2.medianBlur(reduced, PRE_MEDIAN), (gw, gh), interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask, (gw, gh), interpolation=cv2.INTER_AREA)
    near = cv2.dilate((m > BG_SURE).astype(np.uint8), np.ones((3, 3), np.uint8))
    known = (1 - near).astype(np.uint8)
    if known.sum() < 64:
        return None
    model = _fill_median(small, known)
    # the spread of the backdrop's cells around the model (away from the subject)
    far = cv2.erode(known, np.ones((5, 5), np.uint8)) > 0
    if far.sum() < 64:
        far = known > 0
    resid = np.abs(small.astype(np.int16) - model).max(axis=2)
    spread = float(1.4826 * np.median(resid[far]))
    spread95 = float(np.percentile(resid[far], 95))
    plain = spread <= BUSY_LEVELS and spread95 <= 3 * BUSY_LEVELS
    grid = model.astype(np.float32)
    # full-size noise: one pixel per far cell (its centre), against the model there
    ys, xs = np.nonzero(far)
    X = np.minimum(((xs + 0.5) * (dw * k / gw)).astype(np.intp), w - 1)
    Y = np.minimum(((ys + 0.5) * (dh * k / gh)).astype(np.intp), h - 1)
    diff = rgb[Y, X].astype(np.float32) - grid[ys, xs]
    noise = float(1.4826 * np.median(np.abs(diff - np.median(diff, axis=0))))
    return Backdrop(grid, (w, h), reduced, k, noise, spread, plain)


def _fill_median(small: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The median of ``small`` (uint8 cells) over ``MEDIAN`` cells after the cells not
    ``known`` are filled from the nearest known ones (integer box means, wider and wider)."""
    filled = small.copy()
    todo = known == 0
    weighted = small * known[..., None]
    for r in FILL_RADII:
        if not todo.any():
            break
        n = cv2.boxFilter(known, cv2.CV_32S, (2 * r + 1,) * 2, normalize=False)
        s = cv2.boxFilter(weighted, cv2.CV_32S, (2 * r + 1,) * 2, normalize=False)
        got = todo & (n > 0)
        filled[got] = ((s[got] + n[got, None] // 2) // n[got, None]).astype(np.uint8)
        todo &= ~got
    if todo.any():  # farther than the widest radius: the backdrop's mean
        filled[todo] = np.rint(small[known > 0].mean(axis=0)).astype(np.uint8)
    return cv2.medianBlur(filled, MEDIAN)
