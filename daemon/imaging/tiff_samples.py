"""TIFF sample formats Pillow cannot decode (or decodes at the wrong scale), by tifffile.

Pillow reads 8- and 16-bit unsigned TIFFs (``daemon.imaging.decode``). A valid
TIFF with another sample format, or one Pillow cannot open (more samples than it
knows), is read here instead, first page, and scaled to 16 bits per sample:

- unsigned integers: their full range (0 .. 2**bits-1);
- signed integers (8, 16, 32-bit): 0 .. the type's maximum; negatives are 0;
- floating point (16, 32, 64-bit): 0.0 .. 1.0, the nominal range of float
  photos (Photoshop's 32-bit mode, HDR merges), clipped; data whose maximum is
  above 1.0 (measurements, 0 .. 255 floats) is scaled by that maximum; NaN is 0.

Layouts: grey (``minisblack``) or RGB, each with an optional alpha (an
ExtraSamples tag saying associated or unassociated alpha); further samples an
ExtraSamples tag calls unspecified are ignored. Anything else (complex
samples, ``miniswhite``, CMYK, palette or Lab with these sample formats, more
samples than the photometric interpretation and the ExtraSamples tag account
for) raises ``UnsupportedTiff`` naming what the file holds.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from daemon.imaging.meta import SourceMeta

_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating point",
            4: "undefined", 5: "complex integer", 6: "complex floating point"}
_ICC, _XMP, _ORIENTATION = 34675, 700, 274


class UnsupportedTiff(ValueError):
    """A valid TIFF whose samples rembgd cannot turn into a photo; the message names them."""


class ImageSize(ValueError):
    """Over the pixel limit (``daemon.imaging.decode`` says so, naming the key)."""

    def __init__(self, width: int, height: int):
        super().__init__(f"{width}x{height}")
        self.width, self.height = width, height


@dataclass(frozen=True)
class TiffPixels:
    pixels: np.ndarray  # HxWxC uint16: C = 1 (grey), 2 (grey, alpha), 3 (RGB), 4 (RGBA)
    orientation: int  # the TIFF Orientation tag (EXIF values), 1 when absent
    meta: SourceMeta  # the ICC profile and XMP packet, when present


def describe(sample_format: int, bits: int) -> str:
    return f"{bits}-bit {_FORMATS.get(sample_format, f'SampleFormat {sample_format}')}"


def _first_page(tif):
    page = tif.pages.first
    return page, int(page.sampleformat), int(page.bitspersample)


def sample_format(data: bytes) -> tuple[int, int] | None:
    """(SampleFormat, bits per sample) of the first page; None when tifffile cannot read
    its header (truncated, damaged: the decoder says why)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data), name="source.tif") as tif:
            _page, fmt, bits = _first_page(tif)
    except Exception:  # noqa: BLE001 - tifffile raises many classes on damaged headers
        return None
    return fmt, bits


def needs_tifffile(data: bytes) -> bool:
    """True when the first page's samples are not unsigned integers of up to 16 bits
    (which Pillow reads)."""
    found = sample_format(data)
    return found is not None and not (found[0] in (1, 4) and found[1] <= 16)


def read(data: bytes, max_pixels: int) -> TiffPixels:
    """The first page as 16-bit samples (see the module docstring). Raises
    ``UnsupportedTiff`` (the format named), ``ImageSize`` over ``max_pixels``, and
    tifffile's errors for damaged data."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data), name="source.tif") as tif:
        page, fmt, bits = _first_page(tif)
        what = f"{describe(fmt, bits)} samples"
        if fmt not in (1, 2, 3):
            raise UnsupportedTiff(f"a valid TIFF with {what}, which rembgd does not support; "
                                  "save it with 8- or 16-bit integer (or float) samples")
        height, width = int(page.imagelength), int(page.imagewidth)
        if width * height > max_pixels:
            raise ImageSize(width, height)
        photometric = page.photometric.name.lower()
        samples = int(page.samplesperpixel)
        extra = [int(e) for e in (page.extrasamples or ())]
        colour = {"minisblack": 1, "rgb": 3}.get(photometric)
        if colour is None or samples < colour:
            raise UnsupportedTiff(
                f"a valid TIFF ({what}, photometric {photometric}, {samples} samples per "
                "pixel) that rembgd does not support: with these samples it reads grey "
                "(minisblack) or RGB, with an optional alpha")
        if samples - colour != len(extra):
            raise UnsupportedTiff(
                f"a valid TIFF ({what}, photometric {photometric}, {samples} samples per "
                f"pixel) whose {samples - colour - len(extra)} extra samples no ExtraSamples "
                "tag describes: rembgd does not support it (an ExtraSamples tag saying "
                "which is alpha, or none, makes it readable)")
        arr = page.asarray()
        tags = page.tags
        orientation = tags.get(_ORIENTATION)
        icc, xmp = tags.get(_ICC), tags.get(_XMP)
        meta = SourceMeta(icc=_as_bytes(icc.value) if icc is not None else None,
                          xmp=_as_bytes(xmp.value) if xmp is not None else None)
    if page.axes.startswith("S"):  # planar configuration "separate"
        arr = np.moveaxis(arr, 0, -1)
    arr = arr.reshape(height, width, samples)
    alpha = extra[0] if extra and extra[0] in (1, 2) else None
    keep = colour + (alpha is not None)
    scaled = to16(arr[..., :keep])
    if alpha == 1:  # associated (premultiplied): un-premultiply
        a = scaled[..., colour:].astype(np.uint32)
        rgb = (scaled[..., :colour].astype(np.uint32) * 65535 + a // 2) // np.maximum(a, 1)
        scaled[..., :colour] = np.minimum(rgb, 65535)
    return TiffPixels(scaled, int(orientation.value) if orientation is not None else 1, meta)


def _as_bytes(value) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, (tuple, list)):
        return bytes(value)
    return None


def to16(arr: np.ndarray) -> np.ndarray:
    """Samples of any integer or float type -> uint16 over the range the module docstring
    gives for their type."""
    kind = arr.dtype.kind
    if kind == "u" and arr.dtype.itemsize <= 2:
        return arr.astype(np.uint16) * (257 if arr.dtype.itemsize == 1 else 1)
    if kind in "ui":
        top = float(np.iinfo(arr.dtype).max)
        unit = np.clip(arr.astype(np.float64), 0, None) / top
    elif kind == "f":
        unit = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(unit.max(initial=0.0))
        if peak > 1.0:
            unit /= peak
        unit = np.clip(unit, 0.0, 1.0)
    else:
        raise UnsupportedTiff(f"samples of type {arr.dtype}")
    return (unit * 65535.0 + 0.5).astype(np.uint16)
