"""Fast PNG encoding of numpy pixel arrays (the daemon's output writer).

Owns one concept: pixels + optional colour/metadata -> PNG bytes. Pure: no I/O.

Why not Pillow: at camera sizes Pillow's encoder (adaptive per-row filter
choice + single-threaded zlib) dominates a cache miss. Here rows get one
fixed PNG filter, computed with numpy in row strips, and are deflated with
ISA-L (``isal.isal_zlib``), several times faster than zlib at similar size.
Measured in ``bench/png_encoder.py`` (results in ``bench/png_encoder.md``).

``level`` keeps zlib's meaning (0 = stored/fastest ... 9 = smallest):

=====  ==================================  ==========
level  deflate                             PNG filter
=====  ==================================  ==========
0      stdlib zlib 0 (stored, no deflate)  None
1-3    ISA-L level 1                       Up
4-9    stdlib zlib, same level, Z_FILTERED Up
=====  ==================================  ==========

Measured on scikit-image photos and 6 MP photo cutouts (smooth and grainy):
ISA-L levels 2 and 3 are no smaller than 1 (3 is slower, sometimes larger);
zlib 1-3 are larger than ISA-L 1 and 7-25x slower, so 1-3 share ISA-L 1.
zlib 4-9 (with libpng's Z_FILTERED strategy) are 2-20% smaller than ISA-L 1
at 10-200x the time, so 4-9 keep zlib. Up beats Sub and Paeth on upscaled
cutouts at the levels measured; Avg is ~3% smaller on native-resolution and
grainy photos but ~7% larger on smooth cutouts, so Up is kept throughout.

Memory: filtered scanlines exist one strip (~1 MiB raw) at a time (plus a
strip-sized big-endian copy for uint16); the PNG grows in one bytearray that
is copied once into the returned bytes, so peak extra memory is about twice
the output size (measured 52 MB for a 24 MB 24 MP RGBA PNG).
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np
from isal import isal_zlib

__all__ = ["encode_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
IDAT_SIZE = 1 << 20  # bytes of the zlib stream per IDAT chunk (the last one: the rest)
STRIP_BYTES = 1 << 20  # raw bytes filtered and fed to the compressor at once
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)
_EXIF_HEADER = b"Exif\x00\x00"
_XMP_KEYWORD = b"XML:com.adobe.xmp"
_MAX_DIM = 2**31 - 1  # PNG limit on width and height


def encode_png(pixels: np.ndarray, *, level: int = 1, icc_profile: bytes | None = None,
               exif: bytes | None = None, xmp: bytes | None = None,
               text: dict[str, str] | None = None, alpha: np.ndarray | None = None) -> bytes:
    """Encode ``pixels`` (HxW, HxWx2, HxWx3 or HxWx4; uint8 or uint16) as PNG bytes.

    Channels map to grey (L, also HxWx1), grey+alpha (LA), RGB and RGBA; any
    strides; uint16 (either byte order) is written as 16-bit big-endian samples. ``icc_profile`` goes into iCCP, ``exif``
    into eXIf (a leading ``Exif\\0\\0`` is stripped), ``xmp`` into an
    uncompressed iTXt ``XML:com.adobe.xmp`` and ``text`` into tEXt chunks
    (Latin-1). ``alpha`` (HxW uint8, with HxWx3 uint8 ``pixels``) is written as the
    fourth channel of an RGBA PNG, interleaved strip by strip: the same file as
    encoding the stacked HxWx4 array, without building it (a 24 MP cutout is 96 MB).
    Raises ValueError for any other dtype, shape, level or option.
    """
    arr = _check_pixels(pixels)
    if alpha is not None:
        if arr.dtype != np.uint8 or arr.shape[2] != 3 or not isinstance(alpha, np.ndarray) \
                or alpha.dtype != np.uint8 or alpha.shape != arr.shape[:2]:
            raise ValueError(f"alpha must be HxW uint8 with HxWx3 uint8 pixels, got pixels "
                             f"{pixels.shape} {pixels.dtype} and alpha "
                             f"{getattr(alpha, 'shape', None)} {getattr(alpha, 'dtype', None)}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"PNG level must be an int from 0 to 9, got {level!r}")
    height, width = arr.shape[:2]
    channels = arr.shape[2] + (alpha is not None)
    depth = 8 * arr.dtype.itemsize

    out = bytearray(SIGNATURE)
    _append_chunk(out, b"IHDR", struct.pack(">IIBBBBB", width, height, depth,
                                            _COLOUR_TYPE[channels], 0, 0, 0))
    if icc_profile is not None:
        profile = zlib.compress(_as_bytes(icc_profile, "icc_profile"))
        _append_chunk(out, b"iCCP", b"ICC Profile\x00\x00" + profile)  # name, NUL, method 0
    if exif is not None:
        exif = _as_bytes(exif, "exif")
        if exif.startswith(_EXIF_HEADER):
            exif = exif[len(_EXIF_HEADER):]
        if not exif:
            raise ValueError("exif is empty")
        _append_chunk(out, b"eXIf", exif)
    if xmp is not None:
        # keyword NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL
        _append_chunk(out, b"iTXt", _XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + _as_bytes(xmp, "xmp"))
    for key, value in (text or {}).items():
        _append_chunk(out, b"tEXt", _text_keyword(key) + b"\x00" + _latin1(value, f"text[{key!r}]"))
    pending = bytearray()
    for piece in _deflate(arr, level, alpha):
        pending += piece
        if len(pending) >= IDAT_SIZE:
            full = len(pending) - len(pending) % IDAT_SIZE
            with memoryview(pending) as view:
                for start in range(0, full, IDAT_SIZE):
                    _append_chunk(out, b"IDAT", view[start:start + IDAT_SIZE])
            del pending[:full]
    if pending:  # the final flush holds at least the Adler-32 trailer, so there is >= 1 IDAT
        _append_chunk(out, b"IDAT", pending)
    _append_chunk(out, b"IEND", b"")
    return bytes(out)


# --- pixels -> compressed scanlines ------------------------------------------------------------

def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype.kind != "u" or pixels.dtype.itemsize not in (1, 2):  # uint16 of either byte order
        raise ValueError(f"pixels must be uint8 or uint16, got dtype {pixels.dtype}")
    arr = pixels[..., np.newaxis] if pixels.ndim == 2 else pixels
    if arr.ndim != 3 or arr.shape[2] not in _COLOUR_TYPE:
        raise ValueError(f"pixels must be HxW, HxWx2, HxWx3 or HxWx4, got shape {pixels.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    if arr.shape[0] > _MAX_DIM or arr.shape[1] > _MAX_DIM:
        raise ValueError(f"PNG width and height are limited to {_MAX_DIM}, got shape {pixels.shape}")
    return arr


def _deflate(arr: np.ndarray, level: int, alpha: np.ndarray | None = None) -> Iterator[bytes]:
    """The zlib stream of the filtered scanlines, compressed strip by strip."""
    if level == 0:
        comp, filt, code = zlib.compressobj(0), _filter_none, 0
    elif level <= 3:
        comp, filt, code = isal_zlib.compressobj(1), _filter_up, 2
    else:  # as libpng: Z_FILTERED suits filtered rows (~10% smaller on grainy photos, same on smooth)
        comp = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
        filt, code = _filter_up, 2
    height, width, channels = arr.shape
    channels += alpha is not None
    row_bytes = width * channels * arr.dtype.itemsize
    rows = max(1, STRIP_BYTES // row_bytes)
    buf = np.empty((min(rows, height), 1 + row_bytes), np.uint8)
    buf[:, 0] = code  # the filter-type byte that starts every scanline
    prev = np.zeros(row_bytes, np.uint8)  # the row above the first row is all zeros
    rgba = None if alpha is None else np.empty((min(rows, height), width, 4), np.uint8)
    for r0 in range(0, height, rows):
        if rgba is None:
            cur = _scanlines(arr[r0:r0 + rows])
        else:  # interleave one strip (cache-sized) instead of a full-size RGBA copy
            n = min(rows, height - r0)
            rgba[:n, :, :3] = arr[r0:r0 + n]
            rgba[:n, :, 3] = alpha[r0:r0 + n]
            cur = rgba[:n].reshape(n, -1)
        n = cur.shape[0]
        filt(cur, prev, buf[:n, 1:])
        piece = comp.compress(buf[:n])
        if piece:
            yield piece
        prev = cur[-1].copy()  # (the strip buffer is reused)
    yield comp.flush()


def _scanlines(strip: np.ndarray) -> np.ndarray:
    """Raw PNG scanline bytes of a strip of rows: (rows, width*bytes_per_pixel) uint8."""
    if strip.dtype == np.uint16:
        strip = strip.astype(">u2", copy=False)  # big-endian: a copy on little-endian hosts
    strip = np.ascontiguousarray(strip)  # no-op for C-contiguous input
    return strip.view(np.uint8).reshape(strip.shape[0], -1)


def _filter_none(cur: np.ndarray, prev: np.ndarray, out: np.ndarray) -> None:
    out[...] = cur


def _filter_up(cur: np.ndarray, prev: np.ndarray, out: np.ndarray) -> None:
    np.subtract(cur[0], prev, out=out[0])  # uint8 arithmetic wraps mod 256, as PNG wants
    np.subtract(cur[1:], cur[:-1], out=out[1:])


# --- chunks ------------------------------------------------------------------------------------

def _append_chunk(out: bytearray, kind: bytes, data: bytes | bytearray | memoryview) -> None:
    out += struct.pack(">I", len(data))
    out += kind
    out += data
    out += struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))


def _as_bytes(value: bytes, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _text_keyword(key: str) -> bytes:
    kw = _latin1(key, "text keyword")
    if not 1 <= len(kw) <= 79 or kw != kw.strip() or b"\x00" in kw or b"  " in kw:
        raise ValueError(f"PNG text keyword must be 1-79 Latin-1 characters without NUL, "
                         f"leading/trailing or double spaces, got {key!r}")
    return kw


def _latin1(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be str, got {type(value).__name__}")
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} must be Latin-1 for a PNG tEXt chunk: {exc}") from None

