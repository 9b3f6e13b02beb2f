"""decode(): EXIF orientation, pixel modes, formats by content, truncation, bomb guard."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import encode, photo
from daemon.imaging import decode as decmod
from daemon.imaging.decode import (DecodeError, ImageTooLarge, TruncatedImage, UnsupportedImage,
                                   decode)
from daemon.runtime import set_max_pixels

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    """A real photo, non-square so that a wrong rotation changes the shape: 128 x 171."""
    return np.ascontiguousarray(photo("astronaut")[::4, ::3])


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[ORIENTATION] = orientation
    return ex.tobytes()


def _pil_rgb(data: bytes) -> np.ndarray:
    """The stored pixels, without any orientation applied."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header that declares ``width`` x ``height`` RGB pixels (tiny IDAT)."""
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


# ------------------------------------------------------------------ orientation

ROTATIONS = {
    6: lambda a: np.rot90(a, -1),  # stored rotated 90° CCW: display = rotate 90° clockwise
    3: lambda a: np.rot90(a, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ROTATIONS))
def test_exif_orientation_jpeg(small, orientation):
    data = encode(small, "JPEG", quality=95, exif=_exif(orientation))
    stored = _pil_rgb(data)
    got = decode(data).rgb
    expected = ROTATIONS[orientation](stored)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("orientation", sorted(ROTATIONS))
def test_exif_orientation_png_exact_pixels(small, orientation):
    got = decode(encode(small, "PNG", exif=_exif(orientation))).rgb
    assert np.array_equal(got, ROTATIONS[orientation](small))


def test_orientation_1_and_absent_leave_pixels(small):
    assert np.array_equal(decode(encode(small, "PNG", exif=_exif(1))).rgb, small)
    assert np.array_equal(decode(encode(small, "PNG")).rgb, small)


@pytest.mark.parametrize("bogus", [0, 9, 255, 65535])
def test_bogus_orientation_value_is_ignored(small, bogus):
    data = encode(small, "JPEG", quality=95, exif=_exif(bogus))
    assert np.array_equal(decode(data).rgb, _pil_rgb(data))


def _jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


CORRUPT_EXIF = {
    "garbage": b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 20,
    "cut_ifd": _exif(6)[: len(_exif(6)) // 2],
    "offset_past_end": _exif(6)[:10] + b"\x7f\xff\xff\xff" + _exif(6)[14:],
    "bad_tiff_header": b"Exif\x00\x00II*\x00\xff\xff\xff\xff",
    "orientation_wrong_type": _exif(6).replace(b"\x00\x03\x00\x00\x00\x01", b"\x00\x09\x00\x00\x00\x05", 1),
}


@pytest.mark.parametrize("name", sorted(CORRUPT_EXIF))
def test_corrupt_exif_in_jpeg_does_not_crash(small, name):
    data = _jpeg_with_app1(encode(small, "JPEG", quality=95), CORRUPT_EXIF[name])
    got = decode(data).rgb
    assert got.shape[2] == 3 and got.size in (small.size,)


@pytest.mark.parametrize("name", sorted(CORRUPT_EXIF))
def test_corrupt_exif_in_png_does_not_crash(small, name):
    """Pillow raises SyntaxError from exif_transpose on a garbage eXIf chunk."""
    got = decode(encode(small, "PNG", exif=CORRUPT_EXIF[name])).rgb
    assert got.shape[2] == 3 and got.size == small.size
    if name in ("garbage", "bad_tiff_header"):
        assert np.array_equal(got, small)  # unreadable EXIF = no orientation


# ------------------------------------------------------------------------ modes


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_rgb_roundtrip_is_exact(small):
    d = decode(encode(small, "PNG"))
    assert d.rgb.dtype == np.uint8 and d.rgb.flags["C_CONTIGUOUS"]
    assert np.array_equal(d.rgb, small)
    assert (d.width, d.height, d.format) == (171, 128, "PNG")


def test_rgba_opaque_keeps_pixels_transparent_goes_white(small):
    alpha = np.full(small.shape[:2], 255, np.uint8)
    alpha[:, :40] = 0
    got = decode(_png(Image.fromarray(np.dstack([small, alpha]), "RGBA"))).rgb
    assert np.array_equal(got[:, 40:], small[:, 40:])
    assert (got[:, :40] == 255).all()


def test_grey_l(small):
    grey = np.asarray(Image.fromarray(small).convert("L"))
    got = decode(_png(Image.fromarray(grey, "L"))).rgb
    assert np.array_equal(got, np.dstack([grey] * 3))


def test_la_composites_over_white(small):
    grey = np.asarray(Image.fromarray(small).convert("L"))
    alpha = np.full_like(grey, 255)
    alpha[:10] = 0
    alpha[10:20] = 128
    got = decode(_png(Image.fromarray(np.dstack([grey, alpha]), "LA"))).rgb
    assert np.array_equal(got[20:, :, 0], grey[20:])
    assert (got[:10] == 255).all()
    half = (grey[10:20].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(got[10:20, :, 0] - half).max() <= 1.5


def test_palette_with_transparency(small):
    pal = Image.fromarray(small).quantize(16)
    idx = np.asarray(pal)
    transparent = int(idx[0, 0])
    data = _png(pal, transparency=transparent)
    assert Image.open(io.BytesIO(data)).mode == "P"
    got = decode(data).rgb
    colours = np.asarray(pal.convert("RGB"))
    mask = idx == transparent
    assert mask.any() and not mask.all()
    assert (got[mask] == 255).all()
    assert np.array_equal(got[~mask], colours[~mask])


def test_palette_without_transparency(small):
    pal = Image.fromarray(small).quantize(64)
    assert np.array_equal(decode(_png(pal)).rgb, np.asarray(pal.convert("RGB")))


def test_cmyk_jpeg(small):
    buf = io.BytesIO()
    Image.fromarray(small).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    got = decode(data).rgb
    assert got.shape == small.shape
    assert np.abs(got.astype(int) - small).mean() < 4  # colours survive, not inverted


def test_i16_png_maps_full_range_linearly():
    ramp = np.linspace(0, 65535, 256 * 64).reshape(64, 256).round().astype(np.uint16)
    data = _png(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    got = decode(data).rgb
    assert got.shape == (64, 256, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    grey = got[..., 0].astype(int)
    expected = np.round(ramp / 257.0)
    assert np.abs(grey - expected).max() <= 1
    assert grey.min() == 0 and grey.max() == 255
    assert (grey == 255).mean() < 0.01  # not clipped to white
    assert (np.diff(grey.ravel()) >= 0).all()  # monotonic


def test_i16_real_photo_mid_tones():
    grey8 = photo("camera")[..., 0]
    data = _png(Image.fromarray(grey8.astype(np.uint16) * 257))  # 16-bit version of it
    got = decode(data).rgb[..., 0]
    assert np.abs(got.astype(int) - grey8).max() <= 1


def test_i16_with_orientation():
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    data = _png(Image.fromarray(ramp), exif=_exif(6))
    got = decode(data).rgb[..., 0]
    assert got.shape == (64, 48)
    assert np.abs(got.astype(int) - np.rot90(np.round(ramp / 257.0), -1)).max() <= 1


def _frames(fmt: str, **kw) -> bytes:
    colours = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    frames = [Image.fromarray(np.full((40, 60, 3), c, np.uint8)) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("WEBP", {"lossless": True})])
def test_animated_first_frame(fmt, kw):
    data = _frames(fmt, **kw)
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) == 3
    d = decode(data)
    assert d.format == fmt and d.rgb.shape == (40, 60, 3)
    assert np.abs(d.rgb.reshape(-1, 3).mean(0) - (200, 30, 30)).max() < 3


# ----------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt,kw,exact", [
    ("JPEG", {"quality": 95}, False), ("PNG", {}, True), ("WEBP", {"lossless": True}, True),
    ("WEBP", {"quality": 90}, False), ("TIFF", {}, True), ("BMP", {}, True)])
def test_formats(small, fmt, kw, exact):
    d = decode(encode(small, fmt, **kw))
    assert d.format == fmt
    if exact:
        assert np.array_equal(d.rgb, small)
    else:
        assert np.abs(d.rgb.astype(int) - small).mean() < 4


def test_format_is_read_from_content_not_name(tmp_path, small):
    path = tmp_path / "really-a-png.jpg"
    path.write_bytes(encode(small, "PNG"))
    d = decode(path.read_bytes())
    assert d.format == "PNG" and np.array_equal(d.rgb, small)


def test_text_named_jpg_is_unsupported(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")
    with pytest.raises(UnsupportedImage, match="not a supported image.*JPEG, PNG, WEBP, TIFF, BMP"):
        decode(path.read_bytes())


def test_other_image_format_is_unsupported(small):
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, "PPM")  # an image, but not an accepted format
    with pytest.raises(UnsupportedImage):
        decode(buf.getvalue())


def test_zero_bytes():
    with pytest.raises(UnsupportedImage, match="empty"):
        decode(b"")


def test_error_classes_share_a_base_and_carry_reasons():
    for cls, reason in ((UnsupportedImage, "unsupported"), (TruncatedImage, "truncated"),
                        (ImageTooLarge, "too_large")):
        assert issubclass(cls, DecodeError) and cls.reason == reason


# -------------------------------------------------------------------- truncation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "GIF"])
@pytest.mark.parametrize("fraction", [0.002, 0.01, 0.3, 0.5, 0.9, 0.99])
def test_truncated(fmt, fraction):
    data = encode(photo("chelsea"), fmt)
    cut = data[: max(16, int(len(data) * fraction))]
    with pytest.raises(TruncatedImage):
        decode(cut)


def test_truncated_jpeg_header_only():
    """A copy that has written only the first few hundred bytes is truncated, not 'corrupt'."""
    data = encode(photo("chelsea"), "JPEG")
    for n in (10, 41, 206):
        with pytest.raises(TruncatedImage):
            decode(data[:n])


def test_corrupt_png_body_is_a_decode_error(small):
    data = bytearray(encode(small, "PNG"))
    start = data.index(b"IDAT") + 4
    data[start:start + 64] = bytes(64)  # zero the zlib stream header and beyond
    with pytest.raises(DecodeError):
        decode(bytes(data))


# ---------------------------------------------------------------- bomb guard


def test_bomb_header_far_over_limit_raises_before_allocating():
    data = _png_declaring(100_000, 100_000)  # 10 G pixels = 30 GB of RGB
    with pytest.raises(ImageTooLarge, match="limit"):
        decode(data)


def test_bomb_header_just_over_limit_raises_our_error():
    """Between the limit and twice it, Pillow only warns; decode() must still refuse."""
    data = _png_declaring(13_000, 13_000)  # 169 M > 150 M default, < 300 M
    with pytest.raises(ImageTooLarge, match="13000x13000") as err:
        decode(data)
    assert "raise `max_image_pixels` in the config to at least 169000000" in str(err.value)


def test_the_default_limit_admits_150_megapixels():
    """Issue 28.7: medium-format backs write 100-150 MP; a 150 MP header passes the limit
    (its pixels are missing here, so it fails later, as truncated: never as too large)."""
    assert decmod.DEFAULT_MAX_PIXELS >= 150_000_000
    with pytest.raises(DecodeError) as err:
        decode(_png_declaring(15_000, 10_000))
    assert not isinstance(err.value, ImageTooLarge), err.value


def test_bomb_does_not_allocate_under_a_memory_cap():
    """In a child whose address space is capped at +1 GiB, the 30 GB header fails cleanly."""
    code = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from test_decode import _png_declaring
        from daemon.imaging.decode import decode, ImageTooLarge
        data = _png_declaring(100_000, 100_000)
        with open("/proc/self/statm") as fh:
            vm = int(fh.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        try:
            decode(data)
        except ImageTooLarge as exc:
            print("ok", exc)
    """)
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, tests_dir], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok"), out.stdout + out.stderr


def test_max_pixels_argument(small):
    with pytest.raises(ImageTooLarge, match="171x128 = 21888 pixels exceeds the limit of 20000"):
        decode(encode(small, "PNG"), max_pixels=20_000)
    assert decode(encode(small, "PNG"), max_pixels=21_888).rgb.shape == small.shape


def test_set_max_pixels_is_configurable(small):
    data = encode(small, "PNG")
    try:
        set_max_pixels(20_000)
        with pytest.raises(ImageTooLarge):
            decode(data)
        set_max_pixels(5_000)  # > 2x over: Pillow's own DecompressionBombError path
        with pytest.raises(ImageTooLarge, match="limit of 5000.*raise `max_image_pixels`"):
            decode(data)
        set_max_pixels(30_000)
        assert decode(data).rgb.shape == small.shape
    finally:
        set_max_pixels(decmod.DEFAULT_MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == decmod.DEFAULT_MAX_PIXELS


def test_degenerate_png_size_is_refused():
    with pytest.raises(DecodeError):
        decode(_png_declaring(0, 5))


# ------------------------------------------------------ full precision, metadata


def test_8_bit_full_is_rgb_itself_and_meta_is_read(small):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x8298] = "(c) Studio"
    d = decode(encode(small, "JPEG", quality=90, exif=exif.tobytes(), xmp=b"<x:xmpmeta>kw</x:xmpmeta>"))
    assert d.full is d.rgb
    parsed = Image.Exif()
    parsed.load(d.meta.exif)
    assert parsed[ORIENTATION] == 1 and parsed[0x8298] == "(c) Studio"
    assert d.meta.xmp == b"<x:xmpmeta>kw</x:xmpmeta>" and d.meta.icc is None
    assert decmod.Decoded(rgb=small, format="PNG").full is small  # older callers


def _deep(small: np.ndarray) -> np.ndarray:
    """16-bit version of ``small`` whose low bytes are not just copies of the high ones."""
    noise = np.random.default_rng(0).integers(-90, 90, small.shape)
    return np.clip(small.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16_bit_png_orientation_matches_the_8_bit_path(small, orientation):
    from daemon.imaging.png import encode_png

    deep = small.astype(np.uint16) * 257
    d16 = decode(encode_png(deep, exif=_exif(orientation)))
    d8 = decode(encode(small, "PNG", exif=_exif(orientation)))
    assert d16.full.dtype == np.uint16
    assert np.array_equal(d16.rgb, d8.rgb)
    assert np.array_equal(d16.full, d8.rgb.astype(np.uint16) * 257)


def test_16_bit_tiff_keeps_every_bit(small):
    import tifffile

    deep = _deep(small)
    buf = io.BytesIO()
    tifffile.imwrite(buf, deep, photometric="rgb", compression="zlib")
    d = decode(buf.getvalue())
    assert d.format == "TIFF" and np.array_equal(d.full, deep)
    assert np.array_equal(d.rgb, np.round(deep / 257.0).astype(np.uint8))


def test_16_bit_planar_tiff(small):
    import tifffile

    deep = _deep(small)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.moveaxis(deep, -1, 0), photometric="rgb", planarconfig="separate")
    assert np.array_equal(decode(buf.getvalue()).full, deep)


def test_16_bit_rgba_png_composites_on_white_at_16_bits(small):
    from daemon.imaging.png import encode_png

    deep = _deep(small)
    alpha = np.full(small.shape[:2], 65535, np.uint16)
    alpha[:, :40] = 0
    alpha[:, 40:60] = 30000
    d = decode(encode_png(np.dstack([deep, alpha])))
    assert d.full.dtype == np.uint16
    assert (d.full[:, :40] == 65535).all()
    assert np.array_equal(d.full[:, 60:], deep[:, 60:])
    a = 30000 / 65535
    half = deep[:, 40:60] * a + 65535 * (1 - a)
    assert np.abs(d.full[:, 40:60] - half).max() <= 1
    assert np.abs(d.rgb.astype(int) - d.full / 257.0).max() <= 0.5


def test_16_bit_grey_png_full(small):
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21 + 7).astype(np.uint16)
    d = decode(_png(Image.fromarray(ramp), exif=_exif(6)))
    assert d.full.dtype == np.uint16 and d.full.shape == (64, 48, 3)
    assert np.array_equal(d.full[..., 1], np.rot90(ramp, -1))


# ------------------------------------------------------------------ HEIC / AVIF


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode(small, fmt):
    decmod.register_codecs()
    decmod.register_codecs()  # idempotent
    exif = Image.Exif()
    exif[0x8298] = "(c) Studio"
    data = encode(small, fmt, quality=90, exif=exif.tobytes())
    assert data[4:8] == b"ftyp" and decmod.sniff(data) == fmt
    d = decode(data)
    assert d.format == fmt and d.rgb.shape == small.shape
    assert np.abs(d.rgb.astype(int) - small).mean() < 6
    parsed = Image.Exif()
    parsed.load(d.meta.exif)
    assert parsed[0x8298] == "(c) Studio"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.9])
def test_truncated_heic_and_avif(fmt, fraction):
    data = encode(photo("chelsea")[::2, ::2], fmt, quality=80)
    with pytest.raises(TruncatedImage):
        decode(data[: max(16, int(len(data) * fraction))])


def test_ftyp_sniffing():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
        return (len(body) + 4).to_bytes(4, "big") + body

    assert decmod.sniff(ftyp(b"heic", b"mif1", b"heic")) == "HEIF"
    assert decmod.sniff(ftyp(b"mif1", b"heic")) == "HEIF"
    assert decmod.sniff(ftyp(b"avif", b"mif1", b"miaf")) == "AVIF"
    assert decmod.sniff(ftyp(b"mif1", b"avif")) == "AVIF"
    assert decmod.sniff(ftyp(b"isom", b"mp41")) is None  # an MP4 video


# ------------------------------------------------------------------ the reduced copy

@pytest.mark.parametrize("kind", ["jpeg-rotated", "png-16", "palette-transparent", "cmyk"])
def test_reduced_copy_is_the_reduction_of_the_decoded_pixels(kind):
    """decode(reduce=...) reduces the decoder's own upright RGB image: exactly what reducing
    ``rgb`` gives, whatever the source's mode, depth or orientation."""
    from daemon.imaging.fingerprint import working_copy

    big = np.ascontiguousarray(np.repeat(np.repeat(photo("chelsea"), 4, axis=0), 3, axis=1))
    if kind == "jpeg-rotated":
        data = encode(big, "JPEG", quality=90, exif=_exif(6))
    elif kind == "png-16":
        data = encode(big[..., 0].astype(np.uint16) * 257 + 128, "PNG")  # 16-bit grey
    elif kind == "palette-transparent":
        img = Image.fromarray(big).quantize(64)
        img.info["transparency"] = 3
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=3)
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        Image.fromarray(big).convert("CMYK").save(buf, "JPEG", quality=90)
        data = buf.getvalue()
    decoded = decode(data, reduce=working_copy)
    expected = working_copy(Image.fromarray(decoded.rgb, "RGB"))
    assert decoded.small.size == expected.size and min(decoded.small.size) < min(big.shape[:2])
    assert np.array_equal(np.asarray(decoded.small), np.asarray(expected))
    assert decode(data).small is None  # only when asked for


# ----------------------------------------- issue 28: TIFF sample formats Pillow cannot read


def _tiff(arr: np.ndarray, **kw) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _without_extrasamples(data: bytes) -> bytes:
    """The file with its ExtraSamples tag (338) renamed to an unused one (337): a writer
    that forgot to say what the samples beyond RGB or grey are."""
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        if struct.unpack_from("<H", out, ifd + 2 + 12 * i)[0] == 338:
            struct.pack_into("<H", out, ifd + 2 + 12 * i, 337)
            return bytes(out)
    raise AssertionError("no ExtraSamples tag")


PHOTO = photo("astronaut")[::8, ::8]  # 64x64 RGB
UNIT = PHOTO.astype(np.float64) / 255.0
assert UNIT.max() == 1.0


@pytest.mark.parametrize("dtype, values", [
    (np.float32, UNIT), (np.float64, UNIT), (np.float16, UNIT),  # nominal 0..1
    (np.float32, UNIT * 800.0),  # above 1: scaled by its maximum
    (np.uint32, UNIT * (2**32 - 1)), (np.int32, UNIT * (2**31 - 1)),
    (np.int16, UNIT * 32767), (np.int8, UNIT * 127)])
@pytest.mark.parametrize("layout", ["rgb", "rgb-planar", "grey"])
def test_valid_tiffs_of_other_sample_formats_decode_at_the_right_scale(dtype, values, layout):
    """A float32 TIFF once failed as "header is incomplete or corrupt"; integer and float
    samples now decode at 16 bits, each over its type's nominal range."""
    expected = UNIT  # (its maximum is 1.0: the above-1 floats scale back to it)
    if layout == "grey":
        values, expected = values[..., 1], np.repeat(expected[..., 1:2], 3, axis=2)
    arr = values.astype(dtype)
    if layout == "rgb-planar":
        data = _tiff(np.moveaxis(arr, -1, 0).copy(), photometric="rgb", planarconfig="separate")
    else:
        data = _tiff(arr, photometric="rgb" if layout != "grey" else "minisblack")
    out = decode(data)
    assert out.format == "TIFF" and out.full.dtype == np.uint16 and out.rgb.shape == (64, 64, 3)
    tolerance = 2.0 / 255 if dtype in (np.float16, np.int8) else 1.0 / 255
    assert np.abs(out.full / 65535.0 - expected).max() <= tolerance


def test_a_float_tiff_with_alpha_is_composited_on_white():
    rgba = np.dstack([UNIT, np.r_[np.zeros((32, 64)), np.ones((32, 64))][..., None]])
    out = decode(_tiff(rgba.astype(np.float32), photometric="rgb", extrasamples=["unassalpha"]))
    assert (out.rgb[:32] == 255).all()  # transparent: white
    assert np.abs(out.rgb[32:].astype(int) - PHOTO[32:]).max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("photometric", ["rgb", "minisblack"])
def test_more_than_4_samples_need_an_extrasamples_tag_else_the_file_is_named(dtype, photometric):
    five = np.dstack([UNIT, UNIT[..., :2]])
    five = (five * (1 if dtype == np.float32 else np.iinfo(dtype).max)).astype(dtype)
    data = _tiff(five, photometric=photometric, planarconfig="contig")
    out = decode(data)  # tifffile marks the extra samples "unspecified": ignored
    first = UNIT if photometric == "rgb" else np.repeat(UNIT[..., :1], 3, axis=2)
    assert np.abs(out.rgb / 255.0 - first).max() <= 1 / 255
    with pytest.raises(UnsupportedImage, match=rf"a valid TIFF \(.*photometric {photometric}, "
                       r"5 samples per pixel\) whose \d extra samples no ExtraSamples tag"):
        decode(_without_extrasamples(data))


@pytest.mark.parametrize("dtype, named", [(np.complex64, "64-bit complex floating point"),
                                          (np.complex128, "128-bit complex floating point")])
def test_complex_samples_are_named(dtype, named):
    with pytest.raises(UnsupportedImage, match=f"a valid TIFF with {named} samples"):
        decode(_tiff((UNIT[..., 0] + 1j).astype(dtype), photometric="minisblack"))


def test_a_float_tiff_over_the_pixel_limit_names_the_key():
    data = _tiff(UNIT.astype(np.float32), photometric="rgb")
    with pytest.raises(ImageTooLarge, match="64x64 = 4096 pixels.*`max_image_pixels`"):
        decode(data, max_pixels=4000)
    with pytest.raises(TruncatedImage):
        decode(data[:100])
