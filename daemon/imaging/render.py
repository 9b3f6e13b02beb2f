"""Masks and render targets: the working-size mask, and mask -> file bytes.

A mask is predicted (and cached) at a working size of at most ``MASK_EDGE``
pixels on the long side: U^2-Net sees 320x320, so a larger mask holds nothing
more, and a 24 MP mask would cost 24 MB of cache and seconds of resizing. It
is made full size once per file and ``refine`` mode (``imaging.refine``: against
the file's own pixels, so a near hit's edges follow the NEW photo), and every
target with that mode is rendered from it, for hits and misses alike (a hit is
byte-identical to what a miss would have written).

The cache keys and their versions are in ``daemon.imaging.keys``. The legacy
``output:`` PNG keeps rembg's own cutout for alpha matting and
background colours; everything else goes through ``imaging.deliver``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from daemon.config import Deliverable, OutputOptions
from daemon.imaging import deliver
from daemon.imaging.keys import MASK_EDGE, Target
from daemon.imaging.png import encode_png
from daemon.imaging.stamp import stamp


def legacy_deliverable(options: OutputOptions) -> Deliverable:
    return Deliverable(name="", format="png", compression=options.png_compression,
                       colour=options.colour, metadata=options.metadata)


def stamp_files(files: dict[str, bytes], wanted: list[Target], sha256: str) -> dict[str, bytes]:
    """Each rendered file stamped with its source's sha256 (``daemon.imaging.stamp``)."""
    fmt = {t.name: t.deliverable.format if t.deliverable is not None else "png" for t in wanted}
    return {name: stamp(data, fmt[name], sha256) for name, data in files.items()}


def working_mask_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MASK_EDGE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a mask to (width, height); a no-op when it already fits."""
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(mask, "L").resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def predict_mask(engine, rgb: np.ndarray, options: OutputOptions,
                 full_size: tuple[int, int] | None = None) -> np.ndarray:
    """The model's mask at the working size of an image of ``full_size`` (width, height).

    ``rgb`` is the model's input: the image itself (``full_size`` None) or a reduced copy
    of it (``fingerprint.working_copy``, shorter side >= 512 px: U^2-Net sees 320x320).
    The mask comes back at the input's size and is fitted to the working size; from
    the reduced copy it agrees with the full-size input at IoU >= 0.98 (tests) at a
    fraction of the resizing (a 24 MP LANCZOS reduction alone took ~0.35 s).
    """
    width, height = full_size or (rgb.shape[1], rgb.shape[0])
    size = working_mask_size(width, height)
    img = Image.fromarray(rgb, "RGB")
    if img.size[0] > size[0]:  # larger than the working size: never feed more than that
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    mask = engine.predict(np.asarray(img))
    if options.post_process_mask:
        from rembg.bg import post_process  # lazy: rembg pulls in scipy and numba

        mask = np.ascontiguousarray(post_process(mask), dtype=np.uint8)
    return fit_mask(mask, *size)


def render_target(target: Target, decoded, mask: np.ndarray, colours=None) -> bytes:
    """The encoded file for ``target``; ``mask`` is at the image's full size; ``colours``
    (a ``daemon.imaging.despill.Patch``): the subject's colours in its partial pixels."""
    if target.deliverable is not None:
        return deliver.render(decoded.full, mask, target.deliverable, decoded.meta, colours)
    options = target.options
    if options.only_mask:
        return encode_png(mask, level=options.png_compression)
    if options.alpha_matting.enabled or options.bgcolor is not None:
        return _rembg_cutout(decoded, mask, options)
    return deliver.render(decoded.full, mask, legacy_deliverable(options), decoded.meta,
                          colours)


def _rembg_cutout(decoded, mask: np.ndarray, options: OutputOptions) -> bytes:
    """rembg's own alpha matting and background colour, on the 8-bit pixels."""
    from rembg.bg import (alpha_matting_cutout, apply_background_color,
                          decontaminate_cutout, naive_cutout)

    img = Image.fromarray(decoded.rgb, "RGB")
    mask_img = Image.fromarray(mask, "L")
    am = options.alpha_matting
    if am.enabled:
        try:
            out = alpha_matting_cutout(img, mask_img, am.foreground_threshold,
                                       am.background_threshold, am.erode_size)
        except ValueError:  # degenerate trimap: rembg.remove() falls back to this, so do we
            out = decontaminate_cutout(img, mask_img)
    else:
        out = naive_cutout(img, mask_img)
    if options.bgcolor is not None:
        out = apply_background_color(out, options.bgcolor)
    return deliver.encode(np.asarray(out.convert("RGBA")), legacy_deliverable(options),
                          decoded.meta)


def encode_mask(mask: np.ndarray) -> bytes:
    """The cache's mask PNG: ISA-L level 1, ~0.5 ms at 1.2 MP against zlib 6's ~7.5 ms, for
    ~15 % more bytes (a mask is a few tens of KB)."""
    return encode_png(mask, level=1)


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)
