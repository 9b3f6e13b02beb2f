"""Decoding: file bytes -> orientation-normalised 8-bit RGB pixels.

The format is detected from the content, never from the extension.
Pillow's decompression-bomb guard stays on, with our own pinned limit.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")  # MPO opens via JPEG
DEFAULT_MAX_PIXELS = 100_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half-image
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# decode() enforces the limit itself and maps Pillow's errors; the warnings are noise.
# Module-level filters, because warnings.catch_warnings() is not thread-safe (workers).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")  # EXIF


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

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    def pil(self) -> Image.Image:
        return Image.fromarray(self.rgb, "RGB")


def set_max_pixels(limit: int) -> None:
    """Pin Pillow's bomb guard (process-wide)."""
    Image.MAX_IMAGE_PIXELS = int(limit)


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


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
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


def decode(data: bytes, *, max_pixels: int | None = None) -> Decoded:
    """Decode image bytes. Raises a DecodeError subclass with a specific message."""
    if not data:
        raise UnsupportedImage("empty file (0 bytes)")
    limit = int(max_pixels or Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        w, h = img.size
        if w * h > limit:
            raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}")
        if w < 1 or h < 1:
            raise UnsupportedImage(f"degenerate size {w}x{h}")
        fmt = img.format or "unknown"
        img.seek(0)  # animated images: first frame
        img.load()
        img = _exif_transpose(img)
        rgb = _to_rgb(img)
        arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"exceeds the limit of {limit} pixels "
                            f"(decompression-bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        sniffed = _sniff(data)
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
        raise DecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError(f"unexpected pixel layout {arr.shape}")
    return Decoded(rgb=arr, format=fmt)
