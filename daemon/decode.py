"""Decoding: file bytes -> orientation-normalised 8-bit RGB pixels.

The format is detected from the content, never from the extension.
Pillow's decompression-bomb guard stays on, with our own pinned limit.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")  # MPO opens via JPEG
DEFAULT_MAX_PIXELS = 100_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half-image
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            w, h = img.size
            if w * h > limit:
                raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}")
            if w < 1 or h < 1:
                raise UnsupportedImage(f"degenerate size {w}x{h}")
            fmt = img.format or "unknown"
            img.seek(0)  # animated images: first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"not a supported image (accepted: {', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text or isinstance(exc, EOFError) or "broken data stream" in text:
            raise TruncatedImage(f"truncated or incomplete image data: {text}") from exc
        raise DecodeError(f"corrupt image data: {text}") from exc
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, MemoryError) as exc:
        raise DecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError(f"unexpected pixel layout {arr.shape}")
    return Decoded(rgb=arr, format=fmt)
