"""Cache keys: what a cached mask and a stored output depend on, and their versions.

A mask key covers only what changes the mask (the model, its file's checksum,
post-processing, the working size); an output key covers the mask key plus
every render option of one deliverable, so a new deliverable or another
background re-renders from the cached mask. Changing any of them is a miss,
never a stale hit.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from daemon.config import Deliverable, OutputOptions

MASK_VERSION = 4  # bump when mask prediction changes: old masks become misses
RENDER_VERSION = 11  # bump when rendering changes: old stored outputs become misses
# (4: the working-size mask is expanded to full size with BILINEAR, no longer LANCZOS;
#  5: refine, on by default, and OpenCV's bilinear upscale;
#  6: TIFF carries the source-stamp placeholder tag, daemon.imaging.stamp;
#  7: refine in one pass (<= 2048 px) takes its statistics on a grid of 3 px, not 2;
#  8: the detail stage and despill, both on by default: daemon/imaging/detail.py, despill.py;
#  9: the detail stage leaves the sweep lighter than its model (a reflection, a shadow's
#     slope beside the subject) out, as it leaves a shadow out;
#  10: despill on busy backdrops too, from the colours around the edge: imaging/surround.py)
MASK_EDGE = 2048  # the working mask's long side (see daemon.imaging.render)


@dataclass(frozen=True)
class Target:
    """One file to write for a source: the legacy PNG (name "") or a deliverable."""

    name: str
    mask_key: str
    output_key: str
    model: str
    options: OutputOptions
    deliverable: Deliverable | None = None
    refine: str = "none"  # imaging.refine mode: the deliverable's, else the options'
    detail: bool = False  # imaging.detail: the deliverable's, else the options'
    despill: bool = False  # imaging.despill: the deliverable's, else the options'

    @property
    def alpha_key(self) -> tuple[str, bool]:
        """What the full-size alpha depends on: targets sharing it share one alpha."""
        return self.refine, self.detail


def _digest(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def mask_key(options: OutputOptions, model_checksum: str) -> str:
    """Only what changes the mask: the model, its file's checksum, post-processing."""
    return _digest({"v": MASK_VERSION, "model": options.model, "checksum": model_checksum,
                    "post_process": options.post_process_mask, "edge": MASK_EDGE})


def targets(mkey: str, options: OutputOptions, outputs: tuple[Deliverable, ...]) -> list[Target]:
    """The files one source becomes; output keys cover every render option.

    ``refine``, ``detail`` and ``despill`` key the outputs, not the mask: they run at
    render time on the cached working mask against each file's own pixels, so toggling
    them re-renders from the cache without a new inference, and the cached mask stays
    one per image.
    """
    render = ("refine", "detail", "despill")
    if not outputs:
        legacy = {k: v for k, v in asdict(options).items()
                  if k not in ("model", "post_process_mask", *render)}
        modes = {k: getattr(options, k) for k in render}
        return [Target("", mkey, _digest({"v": RENDER_VERSION, "mask": mkey, "legacy": legacy,
                                          **modes}), options.model, options, **modes)]
    out = []
    for d in outputs:
        modes = {k: getattr(options, k) if getattr(d, k) is None else getattr(d, k)
                 for k in render}
        out.append(Target(d.name, mkey, _digest({"v": RENDER_VERSION, "mask": mkey,
                                                 "out": asdict(d), **modes}),
                          options.model, options, d, **modes))
    return out
