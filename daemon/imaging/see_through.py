"""See-through alpha: a transparent subject on a studio sweep given its partial alpha.

Mask models paint a glass opaque. Where the subject is see-through, its pixels obey
``I = alpha * T + (1 - alpha) * B``: ``B`` the backdrop behind it, ``T`` the glass's
own light. A sweep varies smoothly (mostly vertically), so ``B`` behind the subject
is extrapolated row by row from the sure backdrop beside it (linear in x between
the nearest backdrop on the left and on the right). Inside the subject's sure
interior, windows tall enough to see the sweep change are regressed, per channel,
``I`` on ``B``; the slope is ``b = 1 - alpha``. A window counts as evidence only
when all of these hold:

- ``B`` varies across it (std >= ``MIN_SPREAD`` grey levels and ``SPREAD_NOISE``
  times the cell noise), and what shows through, ``b`` times that, is seen above
  the noise (``MIN_SHOWN``, ``SHOWN_NOISE``): no variation, no evidence;
- the fit is as good as the sensor allows: the residual within ``FIT_NOISE`` x the
  noise measured on the backdrop plus ``FIT_FLOOR``, and the dimmed backdrop explains
  ``MIN_R2`` of I's variance in every channel: texture, print, a label, a face, fur,
  anything of the subject's own fails it;
- the slope is in ``SLOPE`` (alpha 0.15-0.85) and the same in all three channels
  within ``ACHROMATIC`` (a clear body dims every channel alike);
- the glass's own light is a colour: ``T = intercept / alpha`` within [0, 1.05]
  per channel, and its share of the pixel ``alpha T / I`` at least ``OWN_LIGHT``:
  an opaque surface lit by the same light as the sweep gives ``I`` proportional
  to ``B`` (no intercept), which is not transparency.

A cell of the sure subject then takes the mean ``1 - b`` of the passing windows that
cover it, weighted by their consensus: none where at most ``CONSENSUS[0]`` of the
candidate windows covering it pass (scattered passes are chance, not a glass), all
from ``CONSENSUS[1]``; bounded below by ``ALPHA_MIN``. The full-size alpha is the
minimum of the refined alpha and that, upscaled (bilinear): it only ever lowers alpha.

It is ambiguous by nature: an opaque matte product whose shading follows the sweep
plus a uniform fill light is, in this model, a glass with its own light
(``shaded-fill`` in bench/groundtruth.py; bench/quality.md measures it), hence an
explicit ``refine: glass`` mode, never the default.

Work happens on an analysis grid of k x k pixel cells (an integer k, long side about
``ANALYSIS`` cells; area means of exact integer sums), cropped to the subject's rows
and its columns with the backdrop beside them, in numpy with a fixed summation order
(cumulative sums), so the result does not depend on thread counts: a cache hit
renders the miss's bytes. Pure: numpy in, numpy out.
"""
from __future__ import annotations

import cv2
import numpy as np

ANALYSIS = 256  # px, long side of the analysis grid
FG_SURE, BG_SURE = 247, 8  # the mask levels refine.py trusts as subject / backdrop
INTERIOR = 2  # cells: the interior lies this far inside the sure subject
BESIDE = 4  # cells of sure backdrop averaged on each side of the subject, per row
GAP = 2  # cells: the backdrop beside the subject starts this far from the band
RX, RY = 1, 20  # window half-sizes in cells (tall: the sweep changes vertically)
MIN_FILL = 0.6  # share of a window that must be interior
MIN_SPREAD = 1.0  # grey levels: std of B across a window
SPREAD_NOISE = 4.0  # ... and in units of the cell noise
FIT_NOISE, FIT_FLOOR = 2.0, 0.5  # residual std <= FIT_NOISE * noise + FIT_FLOOR (levels)
MIN_R2 = 0.7  # the share of I's variance the dimmed backdrop explains, every channel
MIN_SHOWN = 0.8  # grey levels: std of the backdrop's variation seen through (b * spread)
SHOWN_NOISE = 3.0  # ... and in units of the cell noise
SLOPE = (0.15, 0.85)  # b = 1 - alpha
ACHROMATIC = 0.08  # max |b_channel - b_mean|
OWN_LIGHT = 0.08  # alpha T / I, at least
ALPHA_MIN = 0.15
CONSENSUS = (0.5, 0.75)  # share of the windows covering a cell that pass: none below, all above


def see_through(rgb: np.ndarray, mask: np.ndarray):
    """The see-through alpha bound for ``mask`` (the working mask, any size) as
    ((top, left), uint8 bound over that window of rgb, 255: no bound), or None where
    nothing is see-through."""
    height, width = rgb.shape[:2]
    mh, mw = mask.shape
    sure_rows = np.flatnonzero((mask >= FG_SURE).any(axis=1))
    if sure_rows.size == 0:
        return None
    sure_cols = np.flatnonzero((mask >= FG_SURE).any(axis=0))
    # the analysis grid: cells of k x k full-size pixels (an integer k: exact area sums),
    # over the subject's rows and its columns with the backdrop beside them
    k = -(-max(width, height) // ANALYSIS)
    margin = (INTERIOR + GAP + BESIDE + 8) * k
    X0 = max(int(sure_cols[0] * width / mw) - margin, 0) // k * k
    X1 = min(-(-(sure_cols[-1] + 1) * width // mw) + margin, width)
    Y0 = int(sure_rows[0] * height / mh) // k * k
    Y1 = min(-(-(sure_rows[-1] + 1) * height // mh) + k, height)
    grid = (-(-(X1 - X0) // k), -(-(Y1 - Y0) // k))
    if grid[0] * grid[1] < (2 * RX + 1) * (2 * RY + 1):
        return None
    # uint16 at 64x: the cell means keep fractions of a grey level (uint8 would round them)
    img = cv2.resize(rgb[Y0:Y1, X0:X1].astype(np.uint16) << 6, grid,
                     interpolation=cv2.INTER_AREA).astype(np.float64) / 64
    window = mask[int(Y0 * mh / height):-(-Y1 * mh // height),
                  int(X0 * mw / width):-(-X1 * mw // width)]
    m = cv2.resize(window, grid, interpolation=cv2.INTER_AREA)
    sure = m >= FG_SURE
    cross = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    interior = cv2.erode(sure.astype(np.uint8), cross, iterations=INTERIOR) > 0
    if interior.sum() < (2 * RX + 1) * (2 * RY + 1):
        return None
    backdrop = cv2.erode((m <= BG_SURE).astype(np.uint8), cross, iterations=GAP) > 0
    noise = _noise(img, backdrop)
    B, known = _behind(img, backdrop)
    alpha = _alpha(img, B, interior & known, sure, noise)
    if alpha is None:
        return None
    cell = np.rint(alpha * 255).astype(np.uint8)
    return (Y0, X0), cv2.resize(cell, (X1 - X0, Y1 - Y0), interpolation=cv2.INTER_LINEAR)


def apply(rgb: np.ndarray, mask: np.ndarray, full: np.ndarray) -> np.ndarray:
    """``full`` (the refined alpha) bounded by the see-through alpha, in place."""
    found = see_through(rgb, mask)
    if found is not None:
        (y0, x0), bound = found
        region = full[y0:y0 + bound.shape[0], x0:x0 + bound.shape[1]]
        np.minimum(region, bound, out=region)
    return full


def _noise(img: np.ndarray, backdrop: np.ndarray) -> float:
    """The backdrop's per-cell noise (grey levels, channel mean): from horizontal
    neighbours, robustly (a sweep barely changes across one cell)."""
    pair = backdrop[:, 1:] & backdrop[:, :-1]
    if pair.sum() < 50:
        return np.inf
    d = (img[:, 1:] - img[:, :-1]).mean(axis=2)[pair]
    return float(1.4826 * np.median(np.abs(d)) / np.sqrt(2))


def _behind(img: np.ndarray, backdrop: np.ndarray):
    """B behind every cell, row by row: the mean of the nearest BESIDE backdrop cells
    on the left and on the right, interpolated linearly in x (one side where only one
    exists); and where it is known."""
    h, w = backdrop.shape
    # per row, running sums over x of the backdrop and its colour
    bd = backdrop.astype(np.float64)
    cn = np.concatenate([np.zeros((h, 1)), np.cumsum(bd, axis=1)], axis=1)
    cc = np.concatenate([np.zeros((h, 1, 3)), np.cumsum(img * bd[..., None], axis=1)], axis=1)
    x = np.arange(w)
    lo, hi = np.maximum(x - BESIDE + 1, 0), x + 1
    n_win = cn[:, hi] - cn[:, lo]
    local = (cc[:, hi] - cc[:, lo]) / np.maximum(n_win, 1)[..., None]  # mean ending at x
    full = n_win >= BESIDE  # BESIDE consecutive backdrop cells end at x
    idx = np.where(full, x[None, :], -1)
    left = np.maximum.accumulate(idx, axis=1)  # last full window at or left of x
    lo2, hi2 = x, np.minimum(x + BESIDE, w)
    n_r = cn[:, hi2] - cn[:, lo2]
    local_r = (cc[:, hi2] - cc[:, lo2]) / np.maximum(n_r, 1)[..., None]  # mean starting at x
    full_r = n_r >= BESIDE
    idx_r = np.where(full_r, x[None, :], w)
    right = np.minimum.accumulate(idx_r[:, ::-1], axis=1)[:, ::-1]
    rows = np.arange(h)[:, None]
    has_l, has_r = left >= 0, right < w
    L = local[rows, np.maximum(left, 0)]
    R = local_r[rows, np.minimum(right, w - 1)]
    dl = (x[None, :] - left).astype(np.float64)
    dr = (right - x[None, :]).astype(np.float64)
    t = np.where(has_l & has_r, dl / np.maximum(dl + dr, 1), np.where(has_r, 1.0, 0.0))
    B = L * (1 - t)[..., None] + R * t[..., None]
    return B, has_l | has_r


def _box(a: np.ndarray, rx: int, ry: int) -> np.ndarray:
    """Sums over (2 ry + 1) x (2 rx + 1) windows, zero outside; fixed-order cumsums."""
    pad = [(ry + 1, ry), (rx + 1, rx)] + [(0, 0)] * (a.ndim - 2)
    c = np.pad(a, pad).cumsum(axis=0).cumsum(axis=1)
    h, w = a.shape[:2]
    k, l = 2 * ry + 1, 2 * rx + 1
    return c[k:k + h, l:l + w] - c[:h, l:l + w] - c[k:k + h, :w] + c[:h, :w]


def _alpha(img, B, interior, sure, noise: float) -> np.ndarray | None:
    """The see-through alpha per cell (1 where no evidence), or None if none anywhere."""
    if not np.isfinite(noise):
        return None
    w_ = interior.astype(np.float64)
    area = (2 * RX + 1) * (2 * RY + 1)
    n = _box(w_, RX, RY)
    centre = interior & (n >= MIN_FILL * area)
    if not centre.any():
        return None
    wv = w_[..., None]
    nn = np.maximum(n, 1)[..., None]
    mB, mI = _box(B * wv, RX, RY) / nn, _box(img * wv, RX, RY) / nn
    vB = _box(B * B * wv, RX, RY) / nn - mB * mB
    vI = _box(img * img * wv, RX, RY) / nn - mI * mI
    cBI = _box(B * img * wv, RX, RY) / nn - mB * mI
    vB = np.maximum(vB, 1e-9)
    b = cBI / vB
    resid = np.maximum(vI - b * cBI, 0)  # variance of I left after the fit
    b_mean = b.mean(axis=2)
    spread = np.sqrt(vB.mean(axis=2))
    intercept = mI - b * mB
    own = intercept / np.maximum(1 - b, 1e-6)  # T per channel, grey levels
    ok = (centre
          & (spread >= max(MIN_SPREAD, SPREAD_NOISE * noise))
          & (np.sqrt(resid.max(axis=2)) <= FIT_NOISE * noise + FIT_FLOOR)
          & (b_mean > SLOPE[0]) & (b_mean < SLOPE[1])
          & (b_mean * spread >= max(MIN_SHOWN, SHOWN_NOISE * noise))
          & ((cBI * cBI).min(axis=2) >= MIN_R2 * (vB * vI).max(axis=2))
          & (np.abs(b - b_mean[..., None]).max(axis=2) <= ACHROMATIC)
          & (own.min(axis=2) >= 0) & (own.max(axis=2) <= 1.05 * 255)
          & (intercept.sum(axis=2) >= OWN_LIGHT * mI.sum(axis=2)))
    if not ok.any():
        return None
    # each cell: the mean 1 - b of the passing windows covering it, where most of the
    # candidate windows covering it pass (sparse passes are chance, not a glass)
    passing = _box(ok.astype(np.float64), RX, RY)
    votes = _box(np.where(ok, b_mean, 0.0), RX, RY)
    cands = _box(centre.astype(np.float64), RX, RY)
    share = passing / np.maximum(cands, 1)
    weight = np.clip((share - CONSENSUS[0]) / (CONSENSUS[1] - CONSENSUS[0]), 0, 1)
    alpha = 1 - weight * votes / np.maximum(passing, 1)
    alpha = np.where(sure, np.clip(alpha, ALPHA_MIN, 1), 1.0)
    return alpha if (alpha < 1).any() else None
