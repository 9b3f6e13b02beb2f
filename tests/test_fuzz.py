"""Fuzz the decoder and fingerprint entry points (issue 8), bounded for CI.

Property: for any bytes, ``decode`` either returns pixels or raises a
``DecodeError`` subclass (never another exception, never a hang), and
``fingerprint`` never raises on what ``decode`` returned.

Inputs are arbitrary bytes and real JPEG/PNG/GIF/BMP/TIFF/WebP bytes mutated by
bit flips, truncation, splices and header-field rewrites (declared sizes,
chunk lengths). ``REMBGD_FUZZ_EXAMPLES`` raises the example count for a
longer local run; the default keeps the whole file under ~30 s on 2 cores.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon.imaging.decode import DecodeError, decode
from daemon.imaging.fingerprint import fingerprint

# Pillow warns about corrupt EXIF on the way to raising or returning: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = int(os.environ.get("REMBGD_FUZZ_EXAMPLES", "600"))
MAX_PIXELS = 4_000_000  # a mutated header may declare a big image: keep memory bounded

FUZZ = settings(max_examples=EXAMPLES, deadline=3000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:48, 0:40]
    rgb = np.dstack([xx * 6, yy * 5, (xx + yy) * 3]).astype(np.uint8)
    rgb[10:30, 12:28] = rng.integers(0, 255, 3)
    img = Image.fromarray(rgb)
    out = {}

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises exif_transpose
    save("jpeg", img, "JPEG", quality=80, exif=exif.tobytes())
    save("jpeg_progressive", img, "JPEG", quality=70, progressive=True)
    save("png", img, "PNG")
    save("png_palette_trns", img.convert("P"), "PNG", transparency=0)
    save("png_16bit", Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG")
    save("gif", img.convert("P"), "GIF", save_all=True,
         append_images=[img.rotate(90).convert("P")], duration=50, loop=0)
    save("bmp", img, "BMP")
    save("tiff", img, "TIFF", compression="tiff_lzw")
    save("webp", img, "WEBP", quality=60)
    return out


SEEDS = _seed_images()
SEED_NAMES = sorted(SEEDS)


def check(data: bytes) -> None:
    """The property under test."""
    try:
        decoded = decode(data, max_pixels=MAX_PIXELS)
    except DecodeError:
        return
    rgb = decoded.rgb
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS
    fp = fingerprint(data, rgb)
    assert (fp.width, fp.height) == (rgb.shape[1], rgb.shape[0])
    assert len(fp.phash) == 32


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "dup",
                                   "u16", "u32"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "dup":
            end = min(len(data), pos + draw(st.integers(1, 256)))
            data[pos:pos] = data[pos:end]
        else:  # overwrite a 16/32-bit field: sizes, lengths, offsets, counts
            value = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF,
                                          0xFFFFFFFF, 65500]))
            fmt = draw(st.sampled_from([">", "<"])) + ("H" if op == "u16" else "I")
            value &= 0xFFFF if op == "u16" else 0xFFFFFFFF
            packed = struct.pack(fmt, value)
            data[pos:pos + len(packed)] = packed
    return bytes(data)


def test_seeds_decode_and_fingerprint():
    for name, data in SEEDS.items():
        decoded = decode(data)
        assert decoded.rgb.ndim == 3, name
        fingerprint(data, decoded.rgb)


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data):
    check(data)


@pytest.mark.timeout(60)
@FUZZ
@given(st.sampled_from(SEED_NAMES).flatmap(
    lambda name: st.binary(max_size=256).map(lambda tail: SEEDS[name][:16] + tail)))
def test_fuzz_valid_magic_then_garbage(data):
    check(data)


@pytest.mark.timeout(90)
@settings(FUZZ, max_examples=EXAMPLES * 3)
@given(mutated())
def test_fuzz_mutated_real_images(data):
    check(data)


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_fuzz_fingerprint_any_pixels(h, w, seed, data):
    """Any pixel array decode() can return (1x1, 1xN, flat, noisy) fingerprints cleanly."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if seed % 3 == 0:
        rgb[:] = rgb[0, 0]  # flat: zero variance everywhere
    fp = fingerprint(data, rgb)
    assert (fp.width, fp.height) == (w, h) and len(fp.phash) == 32


def test_png_declared_bomb_is_refused_cheaply():
    """A valid PNG header declaring 100000 x 100000 pixels over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x\x9c")
            + chunk(b"IEND", b""))
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == "too_large"
