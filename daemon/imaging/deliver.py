"""Deliverables: upright source pixels + mask + a ``Deliverable`` spec -> the encoded file.

Order: cutout (alpha = mask; 16-bit: mask * 257; the subject's edge colours of
``daemon.imaging.despill`` written in, when given) -> crop to the subject ->
canvas -> max_size -> colour (keep the source ICC | convert to sRGB) ->
flatten on ``spec.flattened`` -> encode.

Formats:
- png: ``daemon.imaging.png.encode_png``, 8 or 16 bits, iCCP, eXIf, XMP iTXt.
  PNG has no IPTC chunk: IPTC is left out.
- tiff: ``tifffile``, 8 or 16 bits, alpha as an *unassociated* extra sample
  (ExtraSamples = 2, what Photoshop and GIMP open as transparency), deflate
  with the horizontal predictor when ``compression > 0``; ICC (34675), XMP
  (700), IPTC (33723), the source stamp's placeholder (``daemon.imaging.stamp``). EXIF: only its IFD0 text tags (description, make,
  model, software, date, artist, copyright) become TIFF tags; the Exif and
  GPS sub-IFDs are not written.
- webp, jpeg: Pillow, 8 bits (16-bit pixels rounded to v / 257). ICC, EXIF
  and XMP; jpeg also IPTC (APP13). EXIF too long for a JPEG APP1 segment
  (64 KiB) is left out. JPEG at quality >= 90 uses 4:4:4 chroma.

``metadata: strip`` writes no EXIF, XMP or IPTC; the ICC profile is colour
and follows ``colour`` either way. A source profile littleCMS cannot read is
treated as no profile (sRGB), as colour-managed viewers do.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from daemon.config.schema import HIDDEN, Deliverable
from daemon.imaging.colour import ColourError, srgb_profile, to_srgb
from daemon.imaging.decode import to8
from daemon.imaging.despill import Patch
from daemon.imaging.geometry import crop, crop_box, limit_size, place_on_canvas, subject_box
from daemon.imaging.meta import EXIF_PREFIX, SourceMeta, photoshop_iptc_segment
from daemon.imaging.png import encode_png
from daemon.imaging.rgba import interleave
from daemon.imaging.stamp import TIFF_PLACEHOLDER, TIFF_TAG

_TIFF_TEXT_TAGS = (271, 272, 315, 33432)  # Make, Model, Artist, Copyright
_JPEG_APP1_MAX = 0xFFFF - 2


def cutout(full: np.ndarray, mask: np.ndarray, colours: Patch | None = None,
           clear: bool = False) -> np.ndarray:
    """HxWx3 pixels + HxW uint8 mask -> HxWx4 of the same dtype, alpha = mask (x257 at 16 bits),
    with ``colours`` written in; ``clear``: black under alpha 0."""
    if mask.shape != full.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image {full.shape[:2]}")
    if mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8, got {mask.dtype}")
    alpha = mask if full.dtype == np.uint8 else np.multiply(mask, 257, dtype=np.uint16)
    out = interleave(full, alpha, np.empty(full.shape[:2] + (4,), full.dtype), clear)
    if colours is not None:
        colours.onto(out)
    return out


def flatten(pixels: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """HxWx4 -> HxWx3 composited over an opaque 8-bit ``background`` colour, rounded."""
    top = 255 if pixels.dtype == np.uint8 else 65535
    wide = np.uint16 if pixels.dtype == np.uint8 else np.uint32  # c*a + bg*(top-a) <= top**2
    bg = np.asarray(background, dtype=wide) * (top // 255)
    a = pixels[..., 3:].astype(wide)
    out = (pixels[..., :3] * a + bg * (top - a) + top // 2) // top
    return out.astype(pixels.dtype)


def _colour(pixels: np.ndarray, mode: str, icc: bytes | None) -> tuple[np.ndarray, bytes | None]:
    if mode == "keep":
        return pixels, icc
    if mode != "srgb":
        raise ValueError(f"colour must be 'keep' or 'srgb', not {mode!r}")
    try:
        return to_srgb(pixels, icc)
    except ColourError:
        return pixels, srgb_profile()


def render(full: np.ndarray, mask: np.ndarray, spec: Deliverable, meta: SourceMeta,
           colours: Patch | None = None) -> bytes:
    """The encoded deliverable file for ``full`` (HxWx3 uint8/uint16) cut out with ``mask``;
    ``colours``: the subject's colours for some pixels (despill), else the photo's."""
    if mask.shape != full.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image {full.shape[:2]}")
    if spec.crop == "subject":
        box = subject_box(mask)
        if box is not None:  # an empty mask keeps the whole frame
            h, w = mask.shape
            box = crop_box(box, spec.margin, spec.margin_unit, (w, h))
            full, mask = crop(full, box), crop(mask, box)  # views: only the crop is cut out
            colours = colours.cropped(box) if colours is not None else None
    elif spec.crop != "none":
        raise ValueError(f"crop must be 'none' or 'subject', not {spec.crop!r}")
    if spec.hidden not in HIDDEN:
        raise ValueError(f"hidden must be 'clear' or 'keep', not {spec.hidden!r}")
    if _straight_png(full, mask, spec):
        return _png_with_alpha(full, mask, spec, meta, colours)
    pixels = cutout(full, mask, colours, clear=spec.hidden == "clear")
    if spec.canvas is not None:
        c = spec.canvas
        pixels = place_on_canvas(pixels, tuple(c.aspect), c.long_edge, c.fill)
    return encode(limit_size(pixels, spec.max_size), spec, meta)


def _straight_png(full: np.ndarray, mask: np.ndarray, spec: Deliverable) -> bool:
    """An 8-bit PNG of the pixels as they are (no canvas, no downscale, no background)."""
    h, w = mask.shape
    return (spec.format == "png" and full.dtype == np.uint8 and spec.canvas is None
            and spec.flattened is None and (not spec.max_size or max(w, h) <= spec.max_size))


def _png_with_alpha(rgb: np.ndarray, mask: np.ndarray, spec: Deliverable,
                    meta: SourceMeta, colours: Patch | None = None) -> bytes:
    """The same file as ``encode(cutout(rgb, mask, colours), ...)``, without the HxWx4 copy:
    the colour transform is per pixel and leaves alpha alone, so it runs on the RGB part
    (and on the patch's colours), and the PNG writer interleaves the alpha and the patch
    strip by strip."""
    rgb, icc = _colour(rgb, spec.colour, meta.icc)
    if colours is not None and spec.colour != "keep":
        values, _ = _colour(colours.values[:, None, :], spec.colour, meta.icc)
        colours = dataclasses.replace(colours, values=np.ascontiguousarray(values[:, 0, :]))
    if spec.metadata == "strip":
        meta = meta.stripped()
    elif spec.metadata != "keep":
        raise ValueError(f"metadata must be 'keep' or 'strip', not {spec.metadata!r}")
    return encode_png(rgb, level=spec.compression, icc_profile=icc, exif=meta.exif,
                      xmp=meta.xmp, alpha=np.ascontiguousarray(mask),
                      colours=None if colours is None else colours.rows,
                      clear=spec.hidden == "clear")


def encode(pixels: np.ndarray, spec: Deliverable, meta: SourceMeta) -> bytes:
    """Finished HxWx4 (or HxWx3) pixels -> the file: colour, background, metadata, format."""
    pixels, icc = _colour(pixels, spec.colour, meta.icc)
    if spec.flattened is not None and pixels.shape[-1] == 4:
        pixels = flatten(pixels, spec.flattened)
    if spec.metadata == "strip":
        meta = meta.stripped()
    elif spec.metadata != "keep":
        raise ValueError(f"metadata must be 'keep' or 'strip', not {spec.metadata!r}")
    encoder = _ENCODERS.get(spec.format)
    if encoder is None:
        raise ValueError(f"unknown output format {spec.format!r}")
    return encoder(np.ascontiguousarray(pixels), spec, icc, meta)


def _png(pixels, spec: Deliverable, icc, meta: SourceMeta) -> bytes:
    return encode_png(pixels, level=spec.compression, icc_profile=icc, exif=meta.exif,
                      xmp=meta.xmp)


def _exif_text_tags(exif: bytes | None) -> dict[int, str]:
    if not exif:
        return {}
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        return {tag: value.strip("\x00") for tag, value in parsed.items()
                if isinstance(value, str) and value.isascii() and value.strip("\x00")}
    except Exception:  # noqa: BLE001 - unreadable EXIF: nothing to carry over
        return {}


def _tiff(pixels, spec: Deliverable, icc, meta: SourceMeta) -> bytes:
    import tifffile

    text = _exif_text_tags(meta.exif)
    extratags = [(tag, "s", 0, text[tag], True) for tag in _TIFF_TEXT_TAGS if tag in text]
    extratags.append((TIFF_TAG, "s", 0, TIFF_PLACEHOLDER, True))  # filled in by stamp.stamp
    if meta.xmp:
        extratags.append((700, 1, len(meta.xmp), meta.xmp, True))  # BYTE
    if meta.iptc:
        extratags.append((33723, 7, len(meta.iptc), meta.iptc, True))  # UNDEFINED
    compressed = spec.compression > 0
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, pixels, photometric="rgb",
        extrasamples=["unassalpha"] if pixels.shape[2] == 4 else None,
        compression="zlib" if compressed else None,
        compressionargs={"level": spec.compression} if compressed else None,
        predictor=compressed or None,
        iccprofile=icc, metadata=None, description=text.get(270),
        software=text.get(305, False), datetime=text.get(306),
        extratags=extratags)
    return buf.getvalue()


def _pil(pixels: np.ndarray) -> Image.Image:
    pixels = to8(pixels)
    return Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB")


def _pil_meta(icc, meta: SourceMeta, exif_prefix: bool) -> dict:
    kw = {}
    if icc:
        kw["icc_profile"] = icc
    if meta.exif:
        exif = EXIF_PREFIX + meta.exif if exif_prefix else meta.exif
        if not exif_prefix or len(exif) <= _JPEG_APP1_MAX:
            kw["exif"] = exif
    if meta.xmp:
        kw["xmp"] = meta.xmp
    return kw


def _webp(pixels, spec: Deliverable, icc, meta: SourceMeta) -> bytes:
    buf = io.BytesIO()
    # exact: libwebp otherwise rewrites the colour under alpha 0 as it compresses best
    _pil(pixels).save(buf, "WEBP", quality=spec.quality, lossless=spec.lossless,
                      exact=spec.hidden == "keep", **_pil_meta(icc, meta, exif_prefix=False))
    return buf.getvalue()


def _jpeg(pixels, spec: Deliverable, icc, meta: SourceMeta) -> bytes:
    img = _pil(pixels)
    if img.mode != "RGB":
        raise ValueError("jpeg needs flattened RGB pixels")
    kw = _pil_meta(icc, meta, exif_prefix=True)
    if meta.iptc:
        try:
            kw["extra"] = photoshop_iptc_segment(meta.iptc)
        except ValueError:
            pass  # too large for one APP13 segment: left out
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=spec.quality, subsampling=0 if spec.quality >= 90 else 2, **kw)
    return buf.getvalue()


_ENCODERS = {"png": _png, "tiff": _tiff, "webp": _webp, "jpeg": _jpeg}
