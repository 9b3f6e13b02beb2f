"""Decoding: file bytes -> orientation-normalised pixels and the source's metadata.

``Decoded.rgb`` is 8-bit RGB (the model and fingerprints use it);
``Decoded.full`` is the same upright image at full precision: uint16 for
16-bit sources (PNG RGB/RGBA/LA and grey, TIFF RGB/RGBA and grey) and for TIFFs
of other sample formats (32-bit integers, floats: ``daemon.imaging.tiff_samples``), otherwise
the very same array as ``rgb``. Transparent sources are composited on white
in both. ``Decoded.meta`` holds the ICC profile, EXIF (orientation 1), XMP
and IPTC (``daemon.imaging.meta``).

The format is detected from the content, never from the extension. HEIC/HEIF
(pillow-heif) and AVIF (Pillow) are accepted; ``register_codecs`` registers
the HEIF opener once, on first use.
Pillow's decompression-bomb guard stays on, with our own pinned limit.
"""
from __future__ import annotations

import io
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.imaging import tiff_samples
from daemon.imaging.meta import ORIENTATION, SourceMeta, extract

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF")  # MPO via JPEG
DEFAULT_MAX_PIXELS = 150_000_000  # medium-format backs write 100-150 MP
LIMIT_KEY = "max_image_pixels"  # the config key an ImageTooLarge tells the admin to raise

# Process-wide Pillow settings (bomb limit, truncated images, warning filters) are set by
# daemon.runtime.configure(), never on import.

_codecs_lock = threading.Lock()
_codecs_registered = False


def register_codecs() -> None:
    """Register pillow-heif's HEIF opener with Pillow; idempotent and thread-safe.

    AVIF needs nothing: Pillow reads it itself. Without pillow-heif, HEIC
    files are reported as unsupported.
    """
    global _codecs_registered
    if _codecs_registered:
        return
    with _codecs_lock:
        if not _codecs_registered:
            try:
                import pillow_heif
            except ImportError:
                pass
            else:
                pillow_heif.register_heif_opener()
            _codecs_registered = True


class DecodeError(ValueError):
    """The file cannot be turned into pixels; the message says why."""

    reason = "undecodable"


class UnsupportedImage(DecodeError):
    reason = "unsupported"


class TruncatedImage(DecodeError):
    reason = "truncated"


class ImageTooLarge(DecodeError):
    reason = "too_large"


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # HxWx3 uint8, EXIF orientation applied
    format: str
    full: np.ndarray | None = None  # HxWx3, uint16 for 16-bit sources; else ``rgb`` itself
    meta: SourceMeta = field(default_factory=SourceMeta)
    small: Image.Image | None = None  # decode(reduce=...)'s reduced RGB copy of ``rgb``

    def __post_init__(self) -> None:
        if self.full is None:
            object.__setattr__(self, "full", self.rgb)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    def pil(self) -> Image.Image:
        return Image.fromarray(self.rgb, "RGB")


# Magic bytes of the accepted formats: a file that starts like one of them but
# cannot even be opened is a cut-off (or mangled) header, not "some other format".
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)  # BMP's two-byte "BM" is too weak a signature to tell a cut-off file from text


_HEIF_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"hevx", b"heim", b"heis")
_AVIF_BRANDS = (b"avif", b"avis")


def _sniff_ftyp(data: bytes) -> str | None:
    """HEIF or AVIF from an ISO-BMFF ``ftyp`` box: the major brand, then the compatible ones."""
    if len(data) < 12 or data[4:8] != b"ftyp":
        return None
    end = min(len(data), max(16, int.from_bytes(data[:4], "big")))
    brands = [data[8:12]] + [data[i:i + 4] for i in range(16, end - 3, 4)]
    for brand in brands:
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIF_BRANDS and brand != b"mif1" and brand != b"msf1":
            return "HEIF"
    if any(b in (b"mif1", b"msf1") for b in brands):
        return "HEIF"
    return None


def sniff(data: bytes) -> str | None:
    """The image format the bytes start with (Pillow's name), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    ftyp = _sniff_ftyp(data)
    if ftyp is not None:
        return ftyp
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _riff_shortfall(data: bytes) -> int:
    """Bytes missing from a RIFF (WebP) file, from the size in its own header."""
    if len(data) < 12 or data[:4] != b"RIFF":
        return 0
    declared = int.from_bytes(data[4:8], "little") + 8
    return max(0, declared - len(data))


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block means "as stored", never a failure."""
    try:
        return ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([gray] * 3), "RGB")
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


# ------------------------------------------------------------------ 16-bit sources

_TO8 = ((np.arange(65536, dtype=np.uint32) * 255 + 32895) >> 16).astype(np.uint8)  # round(v/257)
_ORIENT = {  # EXIF orientation -> numpy equivalent of ImageOps.exif_transpose
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def to8(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8, rounded (v / 257); uint8 passes through."""
    return pixels if pixels.dtype == np.uint8 else _TO8[pixels]


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF: as stored, like _exif_transpose
        return 1
    return value if isinstance(value, int) else 1


def _deep_png(data: bytes) -> np.ndarray | None:
    """16-bit RGB / RGBA / grey+alpha PNG at full precision (Pillow reduces them to 8 bits)."""
    if data[12:16] != b"IHDR" or data[24] != 16 or data[25] not in (2, 4, 6):
        return None
    import imagecodecs

    arr = imagecodecs.png_decode(data)
    return arr if arr.dtype == np.uint16 else None


def _deep_tiff(data: bytes, img: Image.Image) -> np.ndarray | None:
    """16-bit unsigned RGB / RGBA TIFF at full precision, first page."""
    tags = img.tag_v2
    bits = tags.get(258)
    bits = bits if isinstance(bits, tuple) else (bits,)
    if tags.get(262) != 2 or len(bits) < 3 or any(b != 16 for b in bits) or \
            tags.get(339, 1) not in (1, (1,) * len(bits)):
        return None
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        arr = page.asarray()
        if page.axes.startswith("S"):  # planar configuration "separate"
            arr = np.moveaxis(arr, 0, -1)
        extra = tuple(page.extrasamples or ())
    if arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    if arr.shape[2] > 3:
        if extra and extra[0] == 1:  # associated alpha: un-premultiply onto white later
            return np.dstack([_unassociate(arr[..., :3], arr[..., 3]), arr[..., 3]])
        return arr[..., :4] if extra and extra[0] == 2 else arr[..., :3]
    return arr


def _unassociate(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * 65535 + a // 2) // np.maximum(a, 1)
    return np.minimum(out, 65535).astype(np.uint16)


def _on_white16(pixels: np.ndarray) -> np.ndarray:
    """HxWx{2,3,4} uint16 (grey/RGB, maybe alpha) -> HxWx3 uint16 on white."""
    channels = pixels.shape[2]
    colour = pixels[..., :1] if channels <= 2 else pixels[..., :3]
    if channels in (2, 4):
        a = pixels[..., -1:].astype(np.uint32)
        # c*a + 65535*(65535-a) <= 65535**2: fits uint32, rounding included
        colour = ((colour * a + 65535 * (65535 - a) + 32767) // 65535).astype(np.uint16)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour)


def _deep(data: bytes, img: Image.Image, fmt: str) -> np.ndarray | None:
    if fmt == "PNG":
        return _deep_png(data)
    if fmt == "TIFF":
        return _deep_tiff(data, img)
    return None


def _grey16(img: Image.Image) -> np.ndarray | None:
    """An upright I;16 image as HxWx3 uint16."""
    if not img.mode.startswith("I;16"):
        return None
    grey = np.asarray(img).astype(np.uint16, copy=False)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def _pixels(data: bytes, img: Image.Image, fmt: str, reduce=None
            ) -> tuple[np.ndarray, np.ndarray, SourceMeta, Image.Image | None]:
    """(rgb, full, meta, reduce(rgb as an image) or None) of an opened image, orientation
    applied."""
    img.load()  # Pillow's errors first: truncation is reported the same for every depth
    meta = extract(img)
    try:
        deep = _deep(data, img, fmt)
    except Exception as exc:  # noqa: BLE001 - imagecodecs / tifffile raise their own classes
        raise DecodeError(f"corrupt 16-bit image data: {type(exc).__name__}: {exc}") from exc
    if deep is not None:
        full = _ORIENT.get(_orientation(img), lambda a: a)(deep)
        full = _on_white16(full)
        rgb = _TO8[full]
        return rgb, full, meta, reduce(Image.fromarray(rgb, "RGB")) if reduce else None
    if _orientation(img) != 1:  # exif_transpose copies even an upright image (72 MB at 24 MP)
        img = _exif_transpose(img)
    full = _grey16(img)
    upright = _to_rgb(img)
    # reduced from Pillow's own image: no numpy -> Pillow copy (~55 ms at 24 MP)
    small = reduce(upright) if reduce else None
    rgb = np.ascontiguousarray(np.asarray(upright, dtype=np.uint8))
    return rgb, (rgb if full is None else full), meta, small


def probe_pixels(data: bytes) -> int:
    """Width x height from the header alone (0 when it cannot be read: decode will say why)."""
    register_codecs()
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode() reports it properly
        return 0
    return max(0, w * h)


def _decode_tiff_samples(data: bytes, limit: int, reduce) -> Decoded:
    """A valid TIFF of a sample format Pillow does not read (``daemon.imaging.tiff_samples``)."""
    try:
        tiff = tiff_samples.read(data, limit)
    except tiff_samples.ImageSize as size:
        w, h = size.width, size.height
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}"
                            f"{_raise_hint(w * h)}") from None
    except tiff_samples.UnsupportedTiff as exc:
        raise UnsupportedImage(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - tifffile / imagecodecs raise their own classes
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise TruncatedImage(f"truncated or incomplete image data: {exc}") from exc
        raise DecodeError(f"corrupt TIFF data: {type(exc).__name__}: {exc}") from exc
    full = _on_white16(_ORIENT.get(tiff.orientation, lambda a: a)(tiff.pixels))
    rgb = _TO8[full]
    small = reduce(Image.fromarray(rgb, "RGB")) if reduce else None
    return Decoded(rgb=rgb, format="TIFF", full=full, meta=tiff.meta, small=small)


def _raise_hint(pixels: int | None) -> str:
    """How to accept the file: the config key, and the value that would admit it."""
    value = f" to at least {pixels}" if pixels else ""
    return f"; to process it, raise `{LIMIT_KEY}` in the config{value}"


def decode(data: bytes, *, max_pixels: int | None = None,
           reduce: Callable[[Image.Image], Image.Image] | None = None) -> Decoded:
    """Decode image bytes. Raises a DecodeError subclass with a specific message.

    ``reduce``: also make ``Decoded.small`` = reduce(the upright RGB image), from the
    decoder's own image (e.g. ``fingerprint.working_copy``)."""
    if not data:
        raise UnsupportedImage("empty file (0 bytes)")
    limit = int(max_pixels or Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
    if sniff(data) == "TIFF" and tiff_samples.needs_tifffile(data):
        return _decode_tiff_samples(data, limit, reduce)
    register_codecs()
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        w, h = img.size
        if w * h > limit:
            raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}"
                                f"{_raise_hint(w * h)}")
        if w < 1 or h < 1:
            raise UnsupportedImage(f"degenerate size {w}x{h}")
        fmt = img.format or "unknown"
        img.seek(0)  # animated images: first frame
        arr, full, meta, small = _pixels(data, img, fmt, reduce)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"exceeds the limit of {limit} pixels "
                            f"(decompression-bomb guard): {exc}{_raise_hint(None)}") from exc
    except UnidentifiedImageError as exc:
        sniffed = sniff(data)
        if sniffed == "TIFF" and tiff_samples.sample_format(data) is not None:
            return _decode_tiff_samples(data, limit, reduce)  # valid, but not for Pillow
        if sniffed is not None:
            raise TruncatedImage(f"starts like a {sniffed} file but its header is incomplete "
                                 f"or corrupt ({len(data)} bytes)") from exc
        raise UnsupportedImage(
            f"not a supported image (accepted: {', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        low = text.lower()
        if "truncated" in low or isinstance(exc, EOFError) or "broken data stream" in low:
            raise TruncatedImage(f"truncated or incomplete image data: {text}") from exc
        missing = _riff_shortfall(data)
        if missing:
            raise TruncatedImage(f"truncated or incomplete image data: {missing} bytes missing "
                                 f"of the {len(data) + missing} its header declares") from exc
        raise DecodeError(f"corrupt image data: {text}") from exc
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, MemoryError) as exc:
        if "end of file" in str(exc).lower():  # pillow-heif: "Unexpected end of file"
            raise TruncatedImage(f"truncated or incomplete image data: {exc}") from exc
        raise DecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or full.shape != arr.shape:
        raise DecodeError(f"unexpected pixel layout {arr.shape}")
    return Decoded(rgb=arr, format=fmt, full=full, meta=meta, small=small)
