"""RGB pixels and an alpha plane interleaved into RGBA: the layout change, done fast.

numpy's strided slice assignment (``out[..., :3] = rgb``) and its masked copy
(``np.copyto(..., where=alpha == 0)``) go element by element; OpenCV's RGB -> RGBA
conversion and one multiply of whole pixels (4 samples as one uint32 / uint64) give
the same bytes ~10x and ~20x faster (docs/benchmarks.md, "RGBA interleave";
bench/rgba_interleave.py).
Pure: arrays in, arrays out.
"""
from __future__ import annotations

import cv2
import numpy as np

_WHOLE_PIXEL = {np.dtype(np.uint8): np.uint32, np.dtype(np.uint16): np.uint64}


def interleave(rgb: np.ndarray, alpha: np.ndarray, out: np.ndarray,
               clear: bool = False) -> np.ndarray:
    """``out`` (HxWx4, C-contiguous, uint8 or uint16 like ``rgb``) filled with ``rgb``
    (HxWx3, any strides) and ``alpha`` (HxW, in ``out``'s scale) as the fourth channel;
    ``clear``: every sample of a pixel whose alpha is 0 is 0 (black, transparent)."""
    if out.dtype not in _WHOLE_PIXEL or rgb.dtype != out.dtype or not out.flags.c_contiguous \
            or out.shape != rgb.shape[:2] + (4,) or alpha.shape != rgb.shape[:2]:
        raise ValueError(f"cannot interleave {rgb.shape} {rgb.dtype} and alpha {alpha.shape} "
                         f"into {out.shape} {out.dtype}")
    if cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA, dst=out) is not out:  # (never seen: the layouts match)
        out[..., :3] = rgb
    out[..., 3] = alpha
    if clear:
        pixels = out.view(_WHOLE_PIXEL[out.dtype])[..., 0]
        np.multiply(pixels, alpha != 0, out=pixels)
    return out
