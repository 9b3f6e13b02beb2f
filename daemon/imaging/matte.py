"""One photo's matte: its full-size alpha per render mode, and the subject's edge colours.

The render stages run in order on the cached working-size mask and the full-size photo:

1. ``refine`` (daemon/imaging/refine.py): the model's soft edge band re-decided;
2. ``detail`` (daemon/imaging/detail.py): thin structures attached to the subject;
3. ``despill`` (daemon/imaging/despill.py): the subject's colour in partial pixels.

``detail`` and ``despill`` share one backdrop model (daemon/imaging/backdrop.py), fitted
once per photo, on first need (on a busy backdrop despill estimates the colours around
the edge instead: daemon/imaging/surround.py). Each alpha and each patch of colours is
computed once per mode and shared by every target that asks for it. Pure: arrays in,
arrays out.
"""
from __future__ import annotations

import numpy as np

from daemon.imaging import backdrop as backdrop_mod
from daemon.imaging import despill, detail
from daemon.imaging.refine import refine

_UNFIT = object()


class Matte:
    """``rgb``: the photo (HxWx3 uint8); ``full``: the same at full precision (uint8 or
    uint16, the pixels the deliverables are cut from); ``mask``: the working-size mask."""

    def __init__(self, rgb: np.ndarray, full: np.ndarray, mask: np.ndarray):
        self.rgb, self.full, self.mask = rgb, full, mask
        self._backdrop = _UNFIT
        self._alphas: dict[tuple[str, bool], np.ndarray] = {}
        self._patches: dict[tuple[str, bool], despill.Patch | None] = {}
        self._decided: np.ndarray | None = None

    @classmethod
    def decided(cls, rgb: np.ndarray, full: np.ndarray, alpha: np.ndarray,
                mask: np.ndarray | None = None) -> "Matte":
        """The matte of an alpha already decided (a retoucher's touch-up): every mode gives
        that alpha, unrefined; only the edge colours are computed, over the backdrop
        fitted around ``mask`` (the model's, as for the first cutout; else the alpha)."""
        matte = cls(rgb, full, alpha if mask is None else mask)
        matte._decided = alpha
        return matte

    @property
    def backdrop(self) -> backdrop_mod.Backdrop | None:
        if self._backdrop is _UNFIT:
            self._backdrop = backdrop_mod.fit(self.rgb, self.mask)
        return self._backdrop

    def alpha(self, refine_mode: str, with_detail: bool) -> np.ndarray:
        """The full-size alpha (uint8) for this refine mode, with or without the detail."""
        key = (refine_mode, with_detail)
        if self._decided is not None:
            return self._decided
        if key not in self._alphas:
            if with_detail:  # on a copy of the refined alpha only if that is kept too
                base = self._alphas.get((refine_mode, False))
                base = refine(self.rgb, self.mask, refine_mode) if base is None else base.copy()
                if not base.flags.writeable:  # (refine may hand back a decoded, read-only mask)
                    base = base.copy()
                self._alphas[key] = detail.recover(self.rgb, self.mask, base, self.backdrop)
            else:
                self._alphas[key] = refine(self.rgb, self.mask, refine_mode)
        return self._alphas[key]

    def colours(self, refine_mode: str, with_detail: bool) -> despill.Patch | None:
        """The subject's colours in the partial pixels of that alpha (``despill.foreground``)."""
        key = (refine_mode, with_detail)
        if key not in self._patches:
            self._patches[key] = despill.foreground(self.full, self.alpha(*key), self.backdrop)
        return self._patches[key]
