"""The subject's and the background's colours around an edge, from the photo itself.

Where the backdrop is not a plain sweep (a room, a table, foliage) no model says what is
behind an edge. Both colours are estimated from the pixels around it instead, on the
photo area-reduced to at most ``REDUCED`` px on the long side:

- ``F0``: the mean of the nearby pixels weighted by ``alpha ** POWER`` (the surely
  subject ones count, a half-transparent one hardly);
- ``B0``: the same with ``(1 - alpha) ** POWER`` (the surely background ones);

over a box of ``RADIUS`` reduced px (36 px at 24 MP, 9 px at 1 MP), widened where it holds no
weight at all. The weights are 8-bit levels and the sums integer box sums, so the
estimates do not depend on OpenCV's thread count; a pixel's estimate is then read
bilinearly from the reduced maps. Memory: the reduced photo and maps, never a full-size
copy. Pure: numpy in, numpy out.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from daemon.imaging.backdrop import sample

REDUCED = 512  # px: the reduced photo's long side, at most
RADIUS = 3  # reduced px: the box the colours are averaged over (half its side)
WIDER = (4, 16)  # ... widened by these factors where it holds no weight (the widest box's
# sums stay within int32: 97 x 97 x 255 x 255)
POWER = 4  # alpha ** POWER weighs a pixel's say in the subject's colour

_LEVELS = np.arange(256) / 255
SUBJECT_WEIGHT = np.rint(255 * _LEVELS ** POWER).astype(np.uint8)
BACKGROUND_WEIGHT = np.rint(255 * (1 - _LEVELS) ** POWER).astype(np.uint8)


@dataclass(frozen=True)
class Surround:
    subject: np.ndarray  # rh x rw x 3 float32: F0 on the reduced grid, the image's levels
    background: np.ndarray  # rh x rw x 3 float32: B0, likewise
    covered: tuple[int, int]  # (width, height) of the image's part the grid covers

    def at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F0, B0), each N x 3 float32, at full-size pixels (xs, ys), bilinear."""
        return sample(self.subject, xs, ys, self.covered), \
            sample(self.background, xs, ys, self.covered)


def estimate(full: np.ndarray, alpha: np.ndarray, wanted: np.ndarray) -> Surround:
    """The colours around the pixels of ``full`` (HxWx3 uint8/uint16) for its ``alpha``
    (HxW uint8), in ``full``'s levels, at least where ``wanted`` (HxW uint8) is not 0."""
    h, w = alpha.shape
    k = max(1, -(-max(h, w) // REDUCED))
    rw, rh = max(w // k, 1), max(h // k, 1)
    if k > 1:  # an exact k x k area reduction of the covered part
        pixels = cv2.resize(full[:rh * k, :rw * k], (rw, rh), interpolation=cv2.INTER_AREA)
        a = cv2.resize(alpha[:rh * k, :rw * k], (rw, rh), interpolation=cv2.INTER_AREA)
        wanted = cv2.resize(wanted[:rh * k, :rw * k], (rw, rh), interpolation=cv2.INTER_AREA)
    else:
        pixels, a = full, alpha
    # the reduced pixels holding a wanted one, and their neighbours (bilinear reads them)
    wanted = cv2.dilate((wanted > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    scale = 1.0
    if pixels.dtype == np.uint16:  # 8-bit levels keep the sums within int32
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
        scale = 257.0
    pixels = pixels.astype(np.uint16)  # weight x level <= 65025
    subject = _weighted_mean(pixels, SUBJECT_WEIGHT[a], wanted) * np.float32(scale)
    background = _weighted_mean(pixels, BACKGROUND_WEIGHT[a], wanted) * np.float32(scale)
    return Surround(subject, background, (rw * k, rh * k))


def _weighted_mean(pixels: np.ndarray, weight: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Box means of ``pixels`` (uint16 levels 0-255) weighted by ``weight`` (uint8), at
    ``RADIUS``, widened where the box holds no weight and the mean is ``wanted``; the
    weighted mean of the whole image where even the widest does not reach any."""
    out, todo = None, None
    product = pixels * weight[..., None]
    for factor in (1, *WIDER):
        side = (2 * RADIUS * factor + 1,) * 2
        n = cv2.boxFilter(weight, cv2.CV_32S, side, normalize=False,
                          borderType=cv2.BORDER_CONSTANT)
        s = cv2.boxFilter(product, cv2.CV_32S, side, normalize=False,
                          borderType=cv2.BORDER_CONSTANT)
        mean = s.astype(np.float32)
        mean /= np.maximum(n, 1).astype(np.float32)[..., None]
        if out is None:
            out, todo = mean, (n == 0) & wanted
        else:  # only where the narrower boxes held no weight
            np.copyto(out, mean, where=(todo & (n > 0))[..., None])
            todo &= n == 0
        if not todo.any():
            return out
    total = int(weight.sum(dtype=np.int64))
    mean = (product.reshape(-1, 3).sum(axis=0, dtype=np.int64) / total if total
            else pixels.reshape(-1, 3).mean(axis=0))  # no weight anywhere: the image's mean
    out[todo] = mean.astype(np.float32)
    return out

