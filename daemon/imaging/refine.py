"""Edge refinement: the working-size mask made true to the full-size photo's edges.

U^2-Net sees 320x320, so upscaled to a camera file every edge of its mask is a soft
band ~22 px wide (at 24 MP) that the backdrop bleeds into. ``refine`` re-decides
alpha inside that band only, from the full-size pixels, with a local two-colour model:

- the band: working-size mask values strictly between ``BG_SURE`` and ``FG_SURE``
  (grown by one pixel); everything else keeps the plainly upscaled mask, its sure levels
  made exact first (``settled``: the model's subject tops out near 250, 97-99 % opaque,
  and its backdrop may keep a haze of a few levels);
- ``B``: the mean colour of the sure backdrop within ``RADIUS`` working pixels;
  ``F``: that of the sure subject, within ``RADIUS`` or, where none is that near
  (a hair strand far from the head's sure core), within ``FAR_RADIUS``;
- alpha = max(projection of the pixel on the segment B -> F,
  (|I - B| - 2 sigma) / (|F - B| - 2 sigma)), clipped to [0, 1]. The projection gives
  mixed pixels (hair, a soft edge, glass) their coverage; the distance term keeps a
  third colour opaque (a dark rim, a strand unlike the body: the projection would call
  it backdrop); ``sigma`` is the backdrop's local noise, so noise is not lifted to alpha;
- low contrast (|F - B| near ``CONTRAST``: white on white) or a busy backdrop (its
  spread sigma rivals |F - B|: shelves, foliage, not a studio sweep) trusts the mask
  instead, in proportion.

Statistics are box sums (OpenCV; the cost does not grow with the radius) on a grid at half
(tiles) or a third (one pass) of the working size, exact integers (int32, and float64 for
the squares), so the bytes never depend on OpenCV's thread count and a cache hit renders
exactly what the miss did. The fields are evaluated only where band
pixels read them: tile by tile when the photo is larger than the working mask, so the cost
follows the outline's length, not the pixel count; in one pass when the working mask is
already full size (<= 2048 px, where tiles cost more in overhead than they save).
Pure: numpy in, numpy out.
Measured against exact alpha in bench/quality.md, where OpenCV's guided filter
(``cv2.ximgproc.guidedFilter``), the textbook choice, is the rejected candidate.
"""
from __future__ import annotations

import cv2
import numpy as np

from daemon.config.schema import REFINES
from daemon.imaging import see_through

BG_SURE, FG_SURE = 8, 247  # working-mask levels outside which the mask is trusted as is
RADIUS = 24  # working px: where the local backdrop and subject colours are gathered
FAR_RADIUS = 96  # working px: the subject's colour for band pixels far from its core
NOISE_SIGMAS = 2.0
CONTRAST = 0.002  # |F - B|^2 (colours 0-1) at which colour and mask weigh the same
TILE = 32  # working px per tile side
# working px per cell of the statistics grid: 2 for tiles (a camera file: 3 costs boundary F
# 0.004 at 24 MP); 3 in one pass (<= 2048 px: quality measured equal, 0.6x the time)
STEP_TILES, STEP_ONE_PASS = 2, 3
REMAP_ROW = 4096  # band pixels per row of the one-pass sampling maps


def refine(rgb: np.ndarray, mask: np.ndarray, mode: str = "edges") -> np.ndarray:
    """The full-size alpha (uint8, rgb's height x width) for the working-size ``mask``.

    ``mode`` "none" is the plain bilinear upscale; "edges" re-decides the uncertain band;
    "glass" is edges, then the see-through alpha (daemon/imaging/see_through.py).
    """
    if mode not in REFINES:
        raise ValueError(f"refine must be one of {', '.join(REFINES)}, not {mode!r}")
    height, width = rgb.shape[:2]
    if mode == "none":
        return upscale(mask, width, height)
    full = upscale(settled(mask), width, height)  # a new array: solved in place
    if mask.shape == rgb.shape[:2]:  # working size is full size (<= 2048 px): one pass
        _BandStats(rgb, mask, STEP_ONE_PASS).solve_all(rgb, full)
    else:
        stats = _BandStats(rgb, mask, STEP_TILES)
        for ty, tx in zip(*np.nonzero(_tiles_with(stats.band))):
            stats.solve_tile(rgb, full, tx * TILE, ty * TILE)
    if mode == "glass":
        see_through.apply(rgb, mask, full)
    return full


_SETTLE = np.arange(256, dtype=np.uint8)
_SETTLE[:BG_SURE + 1], _SETTLE[FG_SURE:] = 0, 255


def settled(mask: np.ndarray) -> np.ndarray:
    """A copy of ``mask`` with its sure levels made exact: the model's subject tops out
    near 250 (97-99 % opaque: a dark page shows through a white product) and its backdrop
    keeps a haze of 1-8; the uncertain band between is left for the solver."""
    return cv2.LUT(mask, _SETTLE)


def upscale(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """The bilinear upscale (``mask`` itself when it is already full size).

    OpenCV's, ~10x Pillow's speed at 24 MP (bench/quality.md), the same filter."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)


class _BandStats:
    """The band at the working size; box sums on a grid of step x step working pixels
    (they average ~50 x 50 working pixels, so the coarser grid loses nothing and costs
    a quarter or a ninth); B, F and the noise are taken from the sums where band pixels
    read them."""

    def __init__(self, rgb: np.ndarray, mask: np.ndarray, step: int):
        self.step = step
        height, width = rgb.shape[:2]
        h, w = mask.shape
        grid = (-(-w // step), -(-h // step))
        self.scale = (width / w, height / h)
        self.grid_scale = (width / grid[0], height / grid[1])
        # Nearest sampling, not an area reduction: single samples keep the full-size
        # noise for the noise estimate, and the sums average enough of them.
        colour = cv2.resize(rgb, grid, interpolation=cv2.INTER_NEAREST)
        square = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))

        def sure(region: np.ndarray) -> np.ndarray:
            region = cv2.erode(region.astype(np.uint8), square)
            return cv2.resize(region, grid, interpolation=cv2.INTER_NEAREST)

        # 0/1 weights times 8-bit colours, summed in int32: exact, and OpenCV's fast path
        fg, bg = sure(mask >= FG_SURE), sure(mask <= BG_SURE)
        fg_colour = colour * fg[..., None]
        self.fg_near = _sums(fg, fg_colour, RADIUS // step)
        self.fg_far = _sums(fg, fg_colour, FAR_RADIUS // step)
        self.bg = _sums(bg, colour * bg[..., None], RADIUS // step)
        # The backdrop's spread around its local mean: sensor noise on a sweep; on a busy
        # backdrop (shelves, foliage) much more, and then the mask is trusted instead.
        # |colour|^2 <= 3 * 255^2: exact in float32, and summed in float64
        wide = colour.astype(np.float32)
        energy = cv2.multiply(cv2.transform(wide * wide, np.ones((1, 3), np.float32)), bg,
                              dtype=cv2.CV_32F)
        self.bg_sq = cv2.boxFilter(energy, cv2.CV_64F, (2 * (RADIUS // step) + 1,) * 2,
                                   normalize=False)
        uncertain = ((mask > BG_SURE) & (mask < FG_SURE)).astype(np.uint8)
        solvable = ((self.bg[0] > 0) & (self.fg_far[0] > 0)).astype(np.uint8)
        solvable = cv2.resize(solvable, (w, h), interpolation=cv2.INTER_NEAREST)
        self.band = cv2.dilate(uncertain, square) & solvable

    def _fields(self, pick):
        """B, F (colours 0-1, float32) and the backdrop's noise at the grid cells that
        ``pick(grid array)`` selects (a window, or a list of cells)."""
        n_near, s_near = pick(self.fg_near[0]), pick(self.fg_near[1])
        n_far, s_far = pick(self.fg_far[0]), pick(self.fg_far[1])
        n_bg, s_bg = pick(self.bg[0]), pick(self.bg[1])
        fg = np.where((n_near > 0)[..., None], s_near / np.maximum(n_near, 1)[..., None],
                      s_far / np.maximum(n_far, 1)[..., None])
        bg = s_bg / np.maximum(n_bg, 1)[..., None]
        square = bg * bg
        variance = pick(self.bg_sq) / np.maximum(n_bg, 1) - (square[..., 0] + square[..., 1]
                                                           + square[..., 2])
        return ((bg / 255).astype(np.float32), (fg / 255).astype(np.float32),
                (np.sqrt(np.maximum(variance, 0)) / 255).astype(np.float32))

    def solve_tile(self, rgb, full, x0: int, y0: int) -> None:
        """Re-decide alpha for the full-size pixels of the working tile at (x0, y0)."""
        h, w = self.band.shape
        x1, y1 = min(x0 + TILE, w), min(y0 + TILE, h)
        sx, sy = self.scale
        # rounded edges: the tiles partition the image, each pixel is solved once
        X0, X1, Y0, Y1 = round(x0 * sx), round(x1 * sx), round(y0 * sy), round(y1 * sy)
        band = _sample(self.band, (X0, Y0, X1, Y1), self.scale, cv2.INTER_NEAREST) > 0
        if not band.any():
            return
        # the grid window under the tile, with a one-cell margin for the bilinear sampling
        gsx, gsy = self.grid_scale
        gh, gw = self.bg_sq.shape
        gx0, gy0 = max(int(X0 / gsx) - 1, 0), max(int(Y0 / gsy) - 1, 0)
        gx1, gy1 = min(int(X1 / gsx) + 2, gw), min(int(Y1 / gsy) + 2, gh)
        B, F, noise = (_sample(f, (X0, Y0, X1, Y1, gx0, gy0), self.grid_scale)[band]
                       for f in self._fields(lambda a: a[gy0:gy1, gx0:gx1]))
        pixel = rgb[Y0:Y1, X0:X1][band]
        full[Y0:Y1, X0:X1][band] = _solve(pixel, full[Y0:Y1, X0:X1][band], B, F, noise)

    def solve_all(self, rgb, full) -> None:
        """Re-decide every band pixel at once (the working mask is full size)."""
        points = cv2.findNonZero(self.band)  # ~4x np.nonzero's speed
        if points is None:
            return
        xs, ys = points.reshape(-1, 2).T  # (N, 2) in OpenCV 5, (N, 1, 2) before
        n = len(ys)
        gsx, gsy = self.grid_scale
        # pixel centre X sits at grid (X + 0.5) / gsx - 0.5, as in _sample; the points go
        # in rows of REMAP_ROW (remap wants each side under 32767)
        rows = -(-n // REMAP_ROW)
        at = np.zeros((2, rows * REMAP_ROW), np.float32)
        at[0, :n], at[1, :n] = (xs + 0.5) / gsx - 0.5, (ys + 0.5) / gsy - 0.5
        at = at.reshape(2, rows, REMAP_ROW)
        # the fields only at the grid cells the bilinear sampling reads: under the band,
        # one cell around
        gh, gw = self.bg_sq.shape
        reach = 2 * (2 * self.step + 1) + 1  # a cell's sample is within 2 step + 1 px
        cells = np.flatnonzero(cv2.resize(cv2.dilate(self.band, np.ones((reach, reach), np.uint8)),
                                          (gw, gh), interpolation=cv2.INTER_NEAREST))

        def pick(grid: np.ndarray) -> np.ndarray:  # take: ~10x boolean indexing's speed
            return grid.reshape(gh * gw, *grid.shape[2:]).take(cells, axis=0)

        def spread(values: np.ndarray) -> np.ndarray:
            field = np.zeros((gh * gw, *values.shape[1:]), np.float32)
            field[cells] = values
            return field.reshape(gh, gw, *values.shape[1:])

        B, F, noise = (cv2.remap(spread(f), at[0], at[1], cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE).reshape(rows * REMAP_ROW, -1)[:n]
                       for f in self._fields(pick))
        flat = ys.astype(np.intp) * full.shape[1] + xs  # take/put: ~3x fancy indexing's speed
        np.put(full, flat, _solve(rgb.reshape(-1, 3).take(flat, axis=0), full.take(flat), B, F,
                                  noise[:, 0]))


def _solve(pixel: np.ndarray, mask: np.ndarray, B: np.ndarray, F: np.ndarray,
           noise: np.ndarray) -> np.ndarray:
    """The new alpha (uint8) of band pixels: colours (N x 3 uint8), their mask (N uint8),
    and per pixel the backdrop B, the subject F (N x 3, 0-1) and the backdrop's noise (N)."""
    pixel = pixel.astype(np.float32) * np.float32(1 / 255)
    mask = mask.astype(np.float32) * np.float32(1 / 255)
    d, e = F - B, pixel - B
    dd = np.einsum("ij,ij->i", d, d)
    towards = np.einsum("ij,ij->i", e, d) / np.maximum(dd, 1e-6)
    floor = NOISE_SIGMAS * noise
    reach = np.sqrt(dd) - floor  # how far the subject stands out of the backdrop's noise
    away = np.where(reach > 0, (np.sqrt(np.einsum("ij,ij->i", e, e)) - floor)
                    / np.maximum(reach, 1e-6), 0)
    alpha = np.clip(np.maximum(towards, away), 0, 1)
    # low contrast, or a busy backdrop whose spread rivals it: trust the mask instead
    trust = dd / (dd + CONTRAST + (2 * floor) ** 2)
    out = trust * alpha + (1 - trust) * mask
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def _tiles_with(band: np.ndarray) -> np.ndarray:
    """Which TILE x TILE tiles of ``band`` hold any pixel (a boolean grid)."""
    h, w = band.shape
    padded = np.zeros((-(-h // TILE) * TILE, -(-w // TILE) * TILE), np.uint8)
    padded[:h, :w] = band
    return padded.reshape(padded.shape[0] // TILE, TILE, -1, TILE).any(axis=(1, 3))


def _sums(weight: np.ndarray, weighted_colour: np.ndarray, radius: int):
    k = (2 * radius + 1,) * 2
    return (cv2.boxFilter(weight, cv2.CV_32S, k, normalize=False),
            cv2.boxFilter(weighted_colour, cv2.CV_32S, k, normalize=False))


def _sample(field: np.ndarray, at, scale, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """``field`` (a window of it with origin wx0, wy0) at full-size pixels [X0, X1) x [Y0, Y1).

    Full-size pixel centre X sits at working (X + 0.5) / sx - 0.5, cv2.resize's convention,
    so tiles sample exactly what one whole-image resize would.
    """
    X0, Y0, X1, Y1, wx0, wy0 = (*at, 0, 0)[:6]
    sx, sy = scale
    m = np.array([[1 / sx, 0, (X0 + 0.5) / sx - 0.5 - wx0],
                  [0, 1 / sy, (Y0 + 0.5) / sy - 0.5 - wy0]])
    return cv2.warpAffine(field, m, (X1 - X0, Y1 - Y0), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
