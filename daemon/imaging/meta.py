"""Source metadata: the ICC profile, EXIF, XMP and IPTC a photo carries.

``extract`` reads them from an opened Pillow image as raw bytes, so that the
deliverables can carry them on unchanged. The one edit: the EXIF orientation
becomes 1, because the decoded pixels are already upright.

Forms (what the writers in ``daemon.imaging.deliver`` expect):
- ``icc``: the ICC profile bytes, only when it describes RGB data (a CMYK or
  grey profile does not fit the RGB pixels decode() produces);
- ``exif``: a TIFF structure (``II*``/``MM*`` header), without the JPEG
  ``Exif\\0\\0`` prefix;
- ``xmp``: the XMP packet (UTF-8 bytes);
- ``iptc``: raw IPTC-IIM records (``\\x1c`` datasets), as in JPEG APP13
  resource 0x0404 and TIFF tag 33723.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace

from PIL import Image

ORIENTATION = 0x0112
EXIF_PREFIX = b"Exif\x00\x00"
TIFF_XMP = 700
TIFF_IPTC = 33723
PHOTOSHOP_IPTC = 0x0404  # image resource id of the IPTC-NAA record
_SUB_IFDS = (0x8769, 0x8825, 0xA005)  # Exif, GPS, Interop pointers: copied as their contents
# Image-structure and embedded-blob tags of a TIFF's IFD0: not metadata, never copied.
_TIFF_STRUCTURE = frozenset((
    254, 255, 256, 257, 258, 259, 262, 263, 266, 269, 273, 277, 278, 279, 280, 281, 284,
    288, 289, 290, 291, 292, 293, 297, 317, 320, 322, 323, 324, 325, 330, 338, 339, 340, 341,
    347, 513, 514, 529, 530, 531, 532, TIFF_XMP, TIFF_IPTC, 34377, 34675, 37724, 50341,
))


@dataclass(frozen=True)
class SourceMeta:
    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    iptc: bytes | None = None

    def stripped(self) -> SourceMeta:
        """Without EXIF, XMP and IPTC. The ICC profile stays: it is colour, not metadata."""
        return replace(self, exif=None, xmp=None, iptc=None)


def _bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif isinstance(value, (tuple, list)):  # a TIFF tag Pillow read as a sequence of ints
        try:
            value = bytes(value) if all(0 <= v < 256 for v in value) else \
                struct.pack(f">{len(value)}I", *value)
        except (TypeError, ValueError, struct.error):
            return None
    elif not isinstance(value, (bytes, bytearray)):
        return None
    return bytes(value) or None


def icc_colour_space(icc: bytes | None) -> bytes | None:
    """The profile's data colour space signature (b'RGB ', b'CMYK', b'GRAY'...)."""
    if icc is None or len(icc) < 128 or icc[36:40] != b"acsp":
        return None
    return icc[16:20]


def _icc(img: Image.Image) -> bytes | None:
    icc = _bytes(img.info.get("icc_profile"))
    return icc if icc_colour_space(icc) == b"RGB " else None


def _exif(img: Image.Image) -> bytes | None:
    """A copy of the EXIF block with the orientation set to 1; an unreadable block is dropped.

    The image's own Exif object is left alone (``exif_transpose`` still needs
    the original orientation). TIFF structure tags, which Pillow reports as
    EXIF for TIFF sources, are not copied.
    """
    try:
        src = img.getexif()
        exif = Image.Exif()
        for tag, value in src.items():
            if tag in _SUB_IFDS:
                exif[tag] = src.get_ifd(tag)
            elif tag not in _TIFF_STRUCTURE:
                exif[tag] = value
        if not len(exif):
            return None
        if ORIENTATION in exif:
            exif[ORIENTATION] = 1
        data = exif.tobytes()
    except Exception:  # noqa: BLE001 - corrupt EXIF raises anything from struct.error to KeyError
        return None
    if data.startswith(EXIF_PREFIX):
        data = data[len(EXIF_PREFIX):]
    return data if data[:4] in (b"II*\x00", b"MM\x00*") else None


def _tiff_tag(img: Image.Image, tag: int):
    tags = getattr(img, "tag_v2", None)
    return tags.get(tag) if tags is not None else None


_XMP_ORIENTATION = (re.compile(rb"(tiff:Orientation\s*=\s*[\"'])\d([\"'])"),
                    re.compile(rb"(<tiff:Orientation>)\s*\d\s*(</tiff:Orientation>)"))


def _xmp(img: Image.Image) -> bytes | None:
    """The XMP packet; a tiff:Orientation in it becomes 1, as in the EXIF."""
    info = img.info
    xmp = next((_bytes(info[k]) for k in ("xmp", "XML:com.adobe.xmp") if info.get(k)), None)
    if xmp is None:
        xmp = _bytes(_tiff_tag(img, TIFF_XMP))
    if xmp is not None:
        for pattern in _XMP_ORIENTATION:
            xmp = pattern.sub(rb"\g<1>1\g<2>", xmp)
    return xmp


def _iptc(img: Image.Image) -> bytes | None:
    photoshop = img.info.get("photoshop")
    if isinstance(photoshop, dict) and photoshop.get(PHOTOSHOP_IPTC):
        return _bytes(photoshop[PHOTOSHOP_IPTC])
    return _bytes(_tiff_tag(img, TIFF_IPTC))


def extract(img: Image.Image) -> SourceMeta:
    """The metadata of an opened (and loaded) image, before any transposition."""
    return SourceMeta(icc=_icc(img), exif=_exif(img), xmp=_xmp(img), iptc=_iptc(img))


def photoshop_iptc_segment(iptc: bytes) -> bytes:
    """A JPEG APP13 segment ("Photoshop 3.0" 8BIM resource 0x0404) holding raw IPTC-IIM."""
    body = iptc + bytes(len(iptc) % 2)  # resource data is padded to an even length
    resource = b"8BIM" + struct.pack(">H", PHOTOSHOP_IPTC) + b"\x00\x00" + \
        struct.pack(">I", len(iptc)) + body
    payload = b"Photoshop 3.0\x00" + resource
    if len(payload) + 2 > 0xFFFF:
        raise ValueError(f"IPTC block of {len(iptc)} bytes does not fit a JPEG APP13 segment")
    return b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload
