"""Test helper: real matrix/TRC ICC v2 display profiles (Adobe RGB (1998), Display P3).

A minimal ICC writer: header, tag table and the tags a matrix/shaper RGB
profile needs (desc, cprt, wtpt, rXYZ/gXYZ/bXYZ adapted to D50, r/g/bTRC).
The primaries come from the colour spaces' published chromaticities; the
Bradford transform adapts them from D65 to the ICC's D50 PCS.
"""
from __future__ import annotations

import io
import struct
from functools import cache
from pathlib import Path

import numpy as np
from PIL import ImageCms

DEBIAN_ADOBE_RGB = Path("/usr/share/color/icc/compatibleWithAdobeRGB1998.icc")

D50 = np.array([0.9642, 1.0, 0.8249])
D65_XY = (0.3127, 0.3290)
BRADFORD = np.array([[0.8951, 0.2664, -0.1614],
                     [-0.7502, 1.7135, 0.0367],
                     [0.0389, -0.0685, 1.0296]])

ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))
DISPLAY_P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
ADOBE_RGB_GAMMA = 563 / 256  # 2.19921875, as the u8Fixed8 the spec stores


def xy_to_xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz_matrix(primaries, white_xy=D65_XY) -> np.ndarray:
    """Linear RGB -> XYZ (relative to the white point), columns are the primaries."""
    cols = np.stack([xy_to_xyz(*p) for p in primaries], axis=1)
    scale = np.linalg.solve(cols, xy_to_xyz(*white_xy))
    return cols * scale


def bradford(src_white: np.ndarray, dst_white: np.ndarray) -> np.ndarray:
    src, dst = BRADFORD @ src_white, BRADFORD @ dst_white
    return np.linalg.inv(BRADFORD) @ np.diag(dst / src) @ BRADFORD


def _s15f16(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15f16(v) for v in xyz)


def _text_tag(text: str) -> bytes:
    return b"text" + bytes(4) + text.encode("ascii") + b"\x00"


def _desc_tag(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\x00"
    return (b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_
            + struct.pack(">II", 0, 0)  # no Unicode description
            + struct.pack(">HB", 0, 0) + bytes(67))  # no ScriptCode description


def _curv_gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, int(round(gamma * 256)))


def _curv_sampled(values: np.ndarray) -> bytes:
    q = np.clip(np.round(values * 65535), 0, 65535).astype(">u2")
    return b"curv" + bytes(4) + struct.pack(">I", len(q)) + q.tobytes()


def srgb_eotf(v: np.ndarray) -> np.ndarray:
    """The sRGB (and Display P3) transfer curve, encoded -> linear."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def build_profile(description: str, primaries, trc: bytes) -> bytes:
    """An ICC v2.1 'mntr' RGB profile with XYZ PCS and matrix/TRC tags."""
    m = bradford(xy_to_xyz(*D65_XY), D50) @ rgb_to_xyz_matrix(primaries)
    d65 = xy_to_xyz(*D65_XY)
    tags = [(b"desc", _desc_tag(description)),
            (b"cprt", _text_tag("No copyright, test profile")),
            (b"wtpt", _xyz_tag(d65)),  # v2: the media white point is the source white
            (b"rXYZ", _xyz_tag(m[:, 0])), (b"gXYZ", _xyz_tag(m[:, 1])), (b"bXYZ", _xyz_tag(m[:, 2])),
            (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, body, placed = [struct.pack(">I", len(tags))], b"", {}
    for sig, data in tags:
        if data not in placed:  # the three TRCs share one copy, as real profiles do
            placed[data] = offset + len(body)
            body += data + bytes(-len(data) % 4)
        table.append(sig + struct.pack(">II", placed[data], len(data)))
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB "
              + b"XYZ " + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + bytes(4)
              + bytes(4) + bytes(8) + bytes(8) + struct.pack(">I", 0)
              + b"".join(_s15f16(v) for v in D50) + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + b"".join(table) + body


@cache
def adobe_rgb() -> bytes:
    return build_profile("Adobe RGB (1998) compatible test profile", ADOBE_RGB_PRIMARIES,
                         _curv_gamma(ADOBE_RGB_GAMMA))


@cache
def display_p3() -> bytes:
    samples = srgb_eotf(np.linspace(0.0, 1.0, 1024))
    return build_profile("Display P3 test profile", DISPLAY_P3_PRIMARIES, _curv_sampled(samples))


def load(icc: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(icc))
