"""The source's sha256 inside every output file: an output says which photo it was made from.

The ledger's record is the fast path; when it is missing or unreadable, the
output's stamp compared with the source's sha256 decides whether the source was
processed (``daemon.ledger``). A stamp holds only the hex digest (no personal
data), so it is written with ``metadata: strip`` too. Per format:

- PNG: a ``tEXt`` chunk ``rembgd:source-sha256`` right after IHDR.
- JPEG: an APP15 segment ``rembgd:source-sha256\\0<hex>`` after SOI (and JFIF's APP0).
- WebP: a ``RBGD`` chunk at the end (unknown chunks are for the extended format,
  so a simple VP8/VP8L file gets a VP8X header first).
- TIFF: the private ASCII tag 65123. The encoder writes it with zeros
  (``TIFF_PLACEHOLDER``) and ``stamp`` fills them in place: TIFF offsets are absolute.

The cache stores outputs unstamped and every write stamps them, so an exact hit,
a pixel hit and a miss of the same source are byte-identical. Pure, except
``read_stamp``, which reads only a file's header (for WebP, its chunk headers).
"""
from __future__ import annotations

import re
import struct
import zlib
from typing import BinaryIO

KEY = b"rembgd:source-sha256"
TIFF_TAG = 65123  # in the TIFF "reusable" private range 65000-65535
TIFF_PLACEHOLDER = KEY.decode() + ":" + "0" * 64  # never a real digest
WEBP_FOURCC = b"RBGD"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_APP15 = b"\xff\xef"
_HEX = re.compile(rb"\A[0-9a-f]{64}\Z")
_UNSET = b"0" * 64


def stamp(data: bytes, fmt: str, sha256: str) -> bytes:
    """``data`` (an encoded ``fmt`` file) carrying ``sha256``; raises ValueError if it is
    not a well-formed file of that format."""
    digest = sha256.encode("ascii")
    if not _HEX.match(digest):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    if fmt == "png":
        return _stamp_png(data, digest)
    if fmt == "jpeg":
        return _stamp_jpeg(data, digest)
    if fmt == "webp":
        return _stamp_webp(data, digest)
    if fmt == "tiff":
        return _stamp_tiff(data, digest)
    raise ValueError(f"no stamp for the format {fmt!r}")


def read_stamp(fh: BinaryIO) -> str | None:
    """The sha256 a file (open, binary, at offset 0) was stamped with; None if it has
    none (written by a version before stamps, or not a rembgd output) or if it cannot
    be parsed (truncated, damaged, another format than its header says): a stamp that
    cannot be read is no stamp, and the source is redone. Only the file's own I/O
    errors (``OSError``) are raised."""
    head = fh.read(12)
    try:
        if head.startswith(_PNG_SIG):
            found = _read_png(fh)
        elif head.startswith(b"\xff\xd8"):
            found = _read_jpeg(fh)
        elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            found = _read_webp(fh)
        elif head[:4] in (b"II*\x00", b"MM\x00*"):
            found = _read_tiff(fh)
        else:
            found = None
    except (ValueError, struct.error, EOFError, OverflowError, MemoryError):
        return None  # damaged headers (a length past the end, a bad chunk): no stamp
    if found is None or not _HEX.match(found) or found == _UNSET:
        return None  # (a TIFF's placeholder, as the cache stores it: not stamped yet)
    return found.decode("ascii")


# ------------------------------------------------------------------ PNG


def _stamp_png(data: bytes, digest: bytes) -> bytes:
    if not data.startswith(_PNG_SIG) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    body = KEY + b"\x00" + digest
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + \
        struct.pack(">I", zlib.crc32(body, zlib.crc32(b"tEXt")))
    end_of_ihdr = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    return b"".join((data[:end_of_ihdr], chunk, data[end_of_ihdr:]))


def _read_png(fh: BinaryIO) -> bytes | None:
    fh.seek(8)
    while len(header := fh.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind in (b"IDAT", b"IEND"):
            return None
        body = fh.read(length)
        if kind == b"tEXt" and body.startswith(KEY + b"\x00"):
            return body[len(KEY) + 1:]
        fh.seek(4, 1)  # CRC
    return None


# ------------------------------------------------------------------ JPEG


def _stamp_jpeg(data: bytes, digest: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG file")
    at = 2
    if data[2:4] == b"\xff\xe0":  # JFIF's APP0 must stay first
        at = 4 + struct.unpack(">H", data[4:6])[0]
    body = KEY + b"\x00" + digest
    return b"".join((data[:at], _APP15, struct.pack(">H", len(body) + 2), body, data[at:]))


def _read_jpeg(fh: BinaryIO) -> bytes | None:
    fh.seek(2)
    while len(header := fh.read(4)) == 4 and header[0] == 0xFF:
        length = struct.unpack(">H", header[2:])[0]
        if header[1] == 0xDA or length < 2:  # start of scan: no more headers
            return None
        body = fh.read(length - 2)
        if header[:2] == _APP15 and body.startswith(KEY + b"\x00"):
            return body[len(KEY) + 1:]
    return None


# ------------------------------------------------------------------ WebP


def _stamp_webp(data: bytes, digest: bytes) -> bytes:
    if not (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
        raise ValueError("not a WebP file")
    first = data[12:16]
    if first != b"VP8X":
        data = data[:12] + _vp8x(first, data[20:30]) + data[12:]
    chunk = WEBP_FOURCC + struct.pack("<I", len(digest)) + digest  # 64 bytes: no padding
    return b"RIFF" + struct.pack("<I", len(data) - 8 + len(chunk)) + data[8:] + chunk


def _vp8x(kind: bytes, payload: bytes) -> bytes:
    """The VP8X chunk a simple (VP8 or VP8L) file needs to carry another chunk."""
    if kind == b"VP8 ":  # frame tag (3), start code (3), 14-bit width and height
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", payload[6:10]))
        flags = 0
    elif kind == b"VP8L" and payload[:1] == b"\x2f":
        bits = struct.unpack("<I", payload[1:5])[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        flags = 0x10 if bits >> 28 & 1 else 0  # alpha
    else:
        raise ValueError(f"unexpected WebP chunk {kind!r}")
    body = bytes((flags, 0, 0, 0)) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"VP8X" + struct.pack("<I", len(body)) + body


def _read_webp(fh: BinaryIO) -> bytes | None:
    fh.seek(12)
    while len(header := fh.read(8)) == 8:
        kind, length = struct.unpack("<4sI", header)
        if kind == WEBP_FOURCC:
            return fh.read(length)
        fh.seek(length + (length & 1), 1)
    return None


# ------------------------------------------------------------------ TIFF


def _stamp_tiff(data: bytes, digest: bytes) -> bytes:
    at = data.find(TIFF_PLACEHOLDER.encode("ascii"))
    if at < 0:
        raise ValueError("TIFF file without the stamp placeholder tag")
    start = at + len(KEY) + 1
    return b"".join((data[:start], digest, data[start + 64:]))


def _read_tiff(fh: BinaryIO) -> bytes | None:
    import tifffile

    fh.seek(0)
    try:  # ``name``: tifffile takes a stream's name from ``fh.name``, an int for an fd
        with tifffile.TiffFile(fh, name="output.tif") as tif:
            tag = tif.pages.first.tags.get(TIFF_TAG)
    except OSError:
        raise
    except Exception:  # tifffile on a damaged file raises more than TiffFileError
        return None
    value = tag.value if tag is not None else None
    if not isinstance(value, str) or not value.startswith(KEY.decode() + ":"):
        return None
    return value[len(KEY) + 1:].encode("ascii", "replace")
