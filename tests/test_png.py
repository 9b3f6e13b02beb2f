"""daemon.imaging.png: exact round trips through three independent decoders, metadata chunks,
chunk structure and CRCs, level semantics, size sanity against Pillow, and input validation."""
from __future__ import annotations

import io
import struct
import zlib
from unittest import mock

import imagecodecs
import numpy as np
import pyspng
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageCms

from daemon.imaging import png
from daemon.imaging.png import encode_png
from tests.helpers import photo

LAYOUTS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def smooth_alpha(h: int, w: int) -> np.ndarray:
    """An elliptical cutout mask with a soft edge, like a model's mask."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((y - h / 2) / (0.4 * h), (x - w / 2) / (0.35 * w))
    return (np.clip((1.1 - r) * 5, 0, 1) * 255).astype(np.uint8)


def photo_pixels(layout: str, name: str = "astronaut") -> np.ndarray:
    """A real photo as uint8 L, LA, RGB or RGBA (the alpha a soft mask, RGB zeroed outside it)."""
    rgb = photo(name)
    alpha = smooth_alpha(*rgb.shape[:2])
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if layout == "L":
        return grey
    if layout == "LA":
        return np.dstack([np.where(alpha > 0, grey, 0), alpha]).astype(np.uint8)
    if layout == "RGB":
        return rgb
    return np.dstack([np.where(alpha[..., None] > 0, rgb, 0), alpha]).astype(np.uint8)


def to_16bit(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 photo -> uint16 whose low bytes are random too, so a dropped low byte shows."""
    low = np.random.default_rng(seed).integers(0, 256, x.shape, dtype=np.uint16)
    return (x.astype(np.uint16) << 8) | low


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        img.load()
        return np.asarray(img)


def spng_decode(data: bytes, like: np.ndarray) -> np.ndarray:
    """pyspng (libspng), undoing its 16-bit quirk: grey and RGB come back with an opaque alpha."""
    out = pyspng.load(data)
    channels = 1 if like.ndim == 2 else like.shape[2]
    if like.dtype == np.uint16 and channels in (1, 3):
        assert out.shape[-1] == channels + 1 and (out[..., -1] == 65535).all()
        out = out[..., :-1]
    return out.reshape(like.shape)


def assert_decodes_to(data: bytes, pixels: np.ndarray) -> None:
    """libpng (imagecodecs) always; libspng where it supports the layout; Pillow's decoder."""
    np.testing.assert_array_equal(imagecodecs.png_decode(data), pixels)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels != 2:  # pyspng 0.1.4 cannot decode LA ("invalid format")
        np.testing.assert_array_equal(spng_decode(data, pixels), pixels)
    got = pillow_decode(data)
    if pixels.dtype == np.uint8 or channels == 1:
        np.testing.assert_array_equal(got, pixels)  # exact (16-bit grey is Pillow's I;16)
    elif channels == 2:  # Pillow opens 16-bit LA as 8-bit RGBA
        high = (pixels >> 8).astype(np.uint8)
        np.testing.assert_array_equal(got, high[..., [0, 0, 0, 1]])
    else:  # Pillow opens 16-bit RGB(A) as 8-bit: the high bytes
        np.testing.assert_array_equal(got, (pixels >> 8).astype(np.uint8))


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, checking each CRC with stdlib zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        out.append((kind, payload))
        pos += 12 + length
    assert pos == len(data)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_8bit_photo_round_trips_exactly(layout):
    pixels = photo_pixels(layout)
    data = encode_png(pixels)
    assert_decodes_to(data, pixels)
    ihdr = chunks(data)[0]
    assert ihdr[0] == b"IHDR"
    assert struct.unpack(">IIBB", ihdr[1][:10]) == (512, 512, 8, {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_16bit_photo_round_trips_exactly(layout):
    pixels = to_16bit(photo_pixels(layout, "coffee"))
    data = encode_png(pixels)
    assert chunks(data)[0][1][8] == 16  # bit depth
    assert_decodes_to(data, pixels)


def test_16bit_big_endian_input_is_the_same_image():
    native = to_16bit(photo_pixels("RGBA", "chelsea"))
    assert encode_png(native.astype(">u2")) == encode_png(native)


def test_every_level_decodes_to_the_same_pixels_and_size_falls_with_level():
    pixels = np.tile(photo_pixels("RGBA"), (2, 2, 1))  # 4 MiB raw: several strips and IDATs
    sizes = {}
    for level in range(10):
        data = encode_png(pixels, level=level)
        np.testing.assert_array_equal(imagecodecs.png_decode(data), pixels)
        sizes[level] = len(data)
    np.testing.assert_array_equal(pillow_decode(encode_png(pixels, level=9)), pixels)
    assert sizes[0] > pixels.nbytes  # stored: no deflate at all
    assert sizes[1] < 0.8 * sizes[0]
    assert sizes[6] < sizes[1] and sizes[9] <= sizes[6]


def test_hxwx1_is_grey():
    grey = photo_pixels("L")
    assert encode_png(grey[..., np.newaxis]) == encode_png(grey)


def test_non_contiguous_views_round_trip():
    rgba = photo_pixels("RGBA")
    for view in (rgba[::-1, ::2], rgba[50:300, 20:400, [2, 1, 0, 3]], np.asfortranarray(rgba),
                 rgba.transpose(1, 0, 2), rgba[..., 0]):
        assert not view.flags.c_contiguous or view is rgba
        assert_decodes_to(encode_png(view), np.ascontiguousarray(view))


def test_idat_chunks_hold_one_mib_each_with_valid_crcs():
    pixels = np.tile(photo_pixels("RGB"), (3, 2, 1))  # 4.5 MiB raw
    data = encode_png(pixels, level=0)  # stored, so the stream is bigger than the raw pixels
    kinds = [k for k, _ in chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    idats = [p for k, p in chunks(data) if k == b"IDAT"]
    assert len(idats) >= 4 and kinds.count(b"IDAT") == len(idats)
    assert all(len(p) == png.IDAT_SIZE for p in idats[:-1]) and 0 < len(idats[-1]) <= png.IDAT_SIZE


def test_tiny_image_has_one_idat():
    data = encode_png(np.array([[7]], np.uint8))
    assert [k for k, _ in chunks(data)] == [b"IHDR", b"IDAT", b"IEND"]
    assert pillow_decode(data).tolist() == [[7]]


def test_icc_profile_round_trips():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode_png(photo_pixels("RGBA"), icc_profile=profile)
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["icc_profile"] == profile
        assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"])))
    (iccp,) = [p for k, p in chunks(data) if k == b"iCCP"]
    name, rest = iccp.split(b"\x00", 1)
    assert 1 <= len(name) <= 79 and rest[0] == 0 and zlib.decompress(rest[1:]) == profile


@pytest.mark.parametrize("with_header", [True, False])
def test_exif_round_trips_without_the_exif_header(with_header):
    exif = Image.Exif()
    exif[0x8298] = "(c) Studio Nord"  # Copyright
    exif[0x013B] = "A. Photographer"  # Artist
    raw = exif.tobytes()
    assert raw.startswith(b"Exif\x00\x00")
    data = encode_png(photo_pixels("RGB"), exif=raw if with_header else raw[6:])
    (payload,) = [p for k, p in chunks(data) if k == b"eXIf"]
    assert payload == raw[6:] and payload[:2] in (b"II", b"MM")
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif()[0x8298] == "(c) Studio Nord"
        assert img.getexif()[0x013B] == "A. Photographer"


def test_xmp_and_text_round_trip():
    xmp = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
           '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
           'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:rights>© Zoë</dc:rights></rdf:Description>'
           '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()
    data = encode_png(photo_pixels("LA"), xmp=xmp, text={"Software": "rembgd", "Comment": "naïve cutout"})
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["xmp"] == xmp
        assert img.text["Software"] == "rembgd" and img.text["Comment"] == "naïve cutout"
    (itxt,) = [p for k, p in chunks(data) if k == b"iTXt"]
    assert itxt.startswith(b"XML:com.adobe.xmp\x00\x00\x00")  # keyword, uncompressed, method 0
    kinds = [k for k, _ in chunks(data)]
    assert kinds.index(b"iTXt") < kinds.index(b"IDAT") and kinds.count(b"tEXt") == 2


def test_level_1_size_is_close_to_pillow_on_a_photo_cutout():
    cutout = np.asarray(Image.fromarray(photo_pixels("RGBA", "coffee")).resize((1200, 800), Image.LANCZOS))
    buf = io.BytesIO()
    Image.fromarray(cutout).save(buf, "PNG", compress_level=1)
    ours = len(encode_png(cutout, level=1))
    assert ours < 1.3 * len(buf.getvalue())


def idat_stream(data: bytes) -> bytes:
    return b"".join(p for k, p in chunks(data) if k == b"IDAT")


def png_scanlines(data: bytes) -> bytes:
    """The filtered scanlines, decompressed by stdlib zlib (which checks the Adler-32)."""
    return zlib.decompress(idat_stream(data))


@pytest.mark.parametrize("level", [0, 1, 6])
def test_segments_on_threads_are_one_valid_stream_and_deterministic(level):
    """A 2.4 MP cutout in 1 MiB segments: several deflate runs stitched into one zlib stream."""
    rgb = np.tile(photo("astronaut"), (3, 4, 1))[:1400, :1700]  # 9.5 MB as RGBA
    alpha = smooth_alpha(*rgb.shape[:2])
    with mock.patch.object(png, "SEGMENT_BYTES", 1 << 20), mock.patch.object(png, "THREADS", 2):
        threaded = encode_png(rgb, alpha=alpha, level=level)
        assert encode_png(rgb, alpha=alpha, level=level) == threaded  # same bytes every time
    with mock.patch.object(png, "SEGMENT_BYTES", 1 << 20), mock.patch.object(png, "THREADS", 1):
        assert encode_png(rgb, alpha=alpha, level=level) == threaded  # threads change nothing
    stream = idat_stream(threaded)
    assert stream[:2] == png._ZLIB_HEADER[level] and (stream[0] * 256 + stream[1]) % 31 == 0
    raw = png_scanlines(threaded)  # one stream: stdlib zlib decodes it whole, Adler-32 checked
    assert len(raw) == 1400 * (1 + 1700 * 4)
    assert_decodes_to(threaded, np.dstack([rgb, alpha]))
    with mock.patch.object(png, "SEGMENT_BYTES", 64 << 20):  # one segment: the same pixels
        assert assert_decodes_to(encode_png(rgb, alpha=alpha, level=level),
                                 np.dstack([rgb, alpha])) is None


@pytest.mark.parametrize("view", ["contiguous", "mirrored", "channels-reversed", "every-other-column"])
def test_alpha_strips_from_any_view_clear_the_hidden_and_take_the_colours(view):
    """The RGBA strips are built from any view of the photo: alpha-0 pixels black (``clear``),
    the ``colours`` patch on top, in strips of a few rows (the last one short)."""
    base = photo("astronaut")[:203, :314]
    pixels = {"contiguous": base, "mirrored": base[:, ::-1], "channels-reversed": base[..., ::-1],
              "every-other-column": photo("astronaut")[:203, :628:2]}[view]
    h, w = pixels.shape[:2]
    alpha = smooth_alpha(h, w)
    partial = np.flatnonzero((alpha > 0) & (alpha < 255))[::7]  # a patch on partial pixels
    values = np.random.default_rng(3).integers(0, 256, (len(partial), 3), dtype=np.uint8)

    def colours(r0: int, r1: int):
        pick = (partial >= r0 * w) & (partial < r1 * w)
        return partial[pick] - r0 * w, values[pick]

    expected = np.dstack([pixels, alpha])
    expected[alpha == 0] = 0
    expected.reshape(-1, 4)[partial, :3] = values
    assert (alpha == 0).any() and (pixels[alpha == 0] != 0).any()  # something to clear
    with mock.patch.object(png, "STRIP_BYTES", 7 * w * 4):
        data = encode_png(pixels, alpha=alpha, colours=colours, clear=True)
    assert_decodes_to(data, expected)


def test_adler32_combine_is_zlibs():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes() + bytes(70_000) + b"\xff" * 66_000
    for cut in (0, 1, 65520, 65521, 65522, 200_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert png.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(data)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzz_small_images_round_trip(data):
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16]))
    channels = data.draw(st.sampled_from([None, 2, 3, 4]))
    h, w = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 24))
    shape = (h, w) if channels is None else (h, w, channels)
    pixels = data.draw(hnp.arrays(dtype, shape))
    level = data.draw(st.integers(0, 9))
    # small strips and IDAT chunks exercise strip boundaries and chunk splitting on tiny images
    strip = data.draw(st.sampled_from([1, 100, png.STRIP_BYTES]))
    segment = data.draw(st.sampled_from([1, 150, png.SEGMENT_BYTES]))  # rows per deflate segment
    threads = data.draw(st.sampled_from([1, 2]))
    idat = data.draw(st.sampled_from([1, 13, png.IDAT_SIZE]))
    with mock.patch.object(png, "STRIP_BYTES", strip), mock.patch.object(png, "IDAT_SIZE", idat), \
            mock.patch.object(png, "SEGMENT_BYTES", segment), mock.patch.object(png, "THREADS", threads):
        encoded = encode_png(pixels, level=level)
    assert_decodes_to(encoded, pixels)
    assert zlib.decompress(idat_stream(encoded)) == png_scanlines(encoded)


@pytest.mark.parametrize("pixels, match", [
    (np.zeros((4, 4), np.float32), "uint8 or uint16"),
    (np.zeros((4, 4), np.int16), "uint8 or uint16"),
    (np.zeros((4, 4), bool), "uint8 or uint16"),
    (np.zeros((4, 4), np.uint32), "uint8 or uint16"),
    (np.zeros(16, np.uint8), "HxW, HxWx2, HxWx3 or HxWx4"),
    (np.zeros((2, 4, 4, 3), np.uint8), "HxW, HxWx2, HxWx3 or HxWx4"),
    (np.zeros((4, 4, 5), np.uint8), "HxW, HxWx2, HxWx3 or HxWx4"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 0), np.uint16), "empty"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_bad_pixels_raise_value_error(pixels, match):
    with pytest.raises(ValueError, match=match):
        encode_png(pixels)


@pytest.mark.parametrize("kwargs, match", [
    ({"level": 10}, "level must be an int from 0 to 9"),
    ({"level": -1}, "level must be an int from 0 to 9"),
    ({"level": 1.0}, "level must be an int from 0 to 9"),
    ({"exif": b"Exif\x00\x00"}, "exif is empty"),
    ({"exif": "II*"}, "exif must be bytes"),
    ({"xmp": "<x/>"}, "xmp must be bytes"),
    ({"text": {"": "x"}}, "keyword"),
    ({"text": {"k" * 80: "x"}}, "keyword"),
    ({"text": {"Title": "日本"}}, "Latin-1"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_png(np.zeros((2, 2, 3), np.uint8), **kwargs)
