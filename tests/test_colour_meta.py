"""ICC profiles and metadata, from real source files through every output format."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, IptcImagePlugin
from skimage.color import deltaE_ciede2000, rgb2lab

import iccprofiles
from tests.helpers import photo
from daemon.config.schema import Deliverable
from daemon.imaging.colour import ColourError, srgb_profile, to_srgb
from daemon.imaging.decode import decode
from daemon.imaging.deliver import render
from daemon.imaging.meta import SourceMeta, extract, photoshop_iptc_segment

FORMATS = ("png", "tiff", "webp", "jpeg")
PROFILES = {"adobe_rgb": iccprofiles.adobe_rgb, "display_p3": iccprofiles.display_p3}
SOURCE_PROFILES = dict(PROFILES)  # the sources tagged in the colour tests
if iccprofiles.DEBIAN_ADOBE_RGB.is_file():
    SOURCE_PROFILES["debian_adobe_rgb"] = iccprofiles.DEBIAN_ADOBE_RGB.read_bytes
COPYRIGHT = "(c) 2024 Studio Nord"
KEYWORD = "kw-red-sneaker"
IPTC = (b"\x1c\x02\x00\x00\x02\x00\x04"  # 2:00 record version
        + b"\x1c\x02\x19" + len(KEYWORD).to_bytes(2, "big") + KEYWORD.encode()  # 2:25 keyword
        + b"\x1c\x02\x74" + len(COPYRIGHT).to_bytes(2, "big") + COPYRIGHT.encode())  # 2:116
XMP = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
       b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
       b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
       b'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
       b'tiff:Orientation="6"><dc:subject><rdf:Bag><rdf:li>' + KEYWORD.encode()
       + b'</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>'
       b'<?xpacket end="w"?>')


def _save(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


class Output:
    """An output file read back with independent readers."""

    def __init__(self, data: bytes, fmt: str):
        self.fmt = fmt
        if fmt == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                self.pixels = page.asarray()
                tags = {t.code: t.value for t in page.tags.values()}
            self.icc = tags.get(34675)
            self.xmp = tags.get(700)
            self.exif = {k: v for k, v in tags.items() if k in (274, 33432)}
        else:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                self.mode = img.mode
                self.pixels = np.asarray(img)
                self.icc = img.info.get("icc_profile")
                xmp = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
                self.xmp = xmp.encode() if isinstance(xmp, str) else xmp
                self.exif = dict(img.getexif())
                self.exif_ifd = dict(img.getexif().get_ifd(0x8769))
        with Image.open(io.BytesIO(data)) as img:
            self.iptc = IptcImagePlugin.getiptcinfo(img) if fmt in ("jpeg", "tiff") else None


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_built_profiles_are_valid_icc(name):
    icc = PROFILES[name]()
    profile = iccprofiles.load(icc)
    assert profile.profile.xcolor_space.strip() == "RGB"
    assert profile.profile.version == pytest.approx(2.1)
    transform = ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB")
    out = ImageCms.applyTransform(Image.new("RGB", (1, 1), (255, 255, 255)), transform)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # white maps to white


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_built_profiles_match_the_colour_space_maths(name):
    """littleCMS with the built profile agrees with the published primaries and curves."""
    icc = PROFILES[name]()
    rgb = np.random.default_rng(1).integers(30, 226, (16, 16, 3)).astype(np.uint8)
    got = np.asarray(ImageCms.applyTransform(
        Image.fromarray(rgb), ImageCms.buildTransform(iccprofiles.load(icc),
                                                      ImageCms.createProfile("sRGB"), "RGB", "RGB")))
    if name == "adobe_rgb":
        primaries, linear = iccprofiles.ADOBE_RGB_PRIMARIES, (rgb / 255.0) ** iccprofiles.ADOBE_RGB_GAMMA
    else:
        primaries, linear = iccprofiles.DISPLAY_P3_PRIMARIES, iccprofiles.srgb_eotf(rgb / 255.0)
    xyz = linear @ iccprofiles.rgb_to_xyz_matrix(primaries).T
    srgb_lin = xyz @ np.linalg.inv(iccprofiles.rgb_to_xyz_matrix(((0.64, 0.33), (0.30, 0.60),
                                                                  (0.15, 0.06)))).T
    inside = (srgb_lin.min(-1) >= 0) & (srgb_lin.max(-1) <= 1)
    encoded = np.where(srgb_lin <= 0.0031308, 12.92 * srgb_lin,
                       1.055 * np.clip(srgb_lin, 0, None) ** (1 / 2.4) - 0.055) * 255
    assert inside.mean() > 0.5
    assert np.abs(got - encoded)[inside].max() <= 1.0


@pytest.mark.skipif(not iccprofiles.DEBIAN_ADOBE_RGB.is_file(), reason="icc-profiles-free not installed")
def test_built_adobe_rgb_matches_debians():
    debian = ImageCms.getOpenProfile(str(iccprofiles.DEBIAN_ADOBE_RGB))
    srgb = ImageCms.createProfile("sRGB")
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3)).astype(np.uint8))
    ours = ImageCms.applyTransform(rgb, ImageCms.buildTransform(iccprofiles.load(iccprofiles.adobe_rgb()),
                                                                srgb, "RGB", "RGB"))
    theirs = ImageCms.applyTransform(rgb, ImageCms.buildTransform(debian, srgb, "RGB", "RGB"))
    assert np.abs(np.asarray(ours, int) - np.asarray(theirs, int)).max() <= 1


# ------------------------------------------------------------------ colour


def _patches() -> np.ndarray:
    """Mid grey | saturated red | saturated green, 64 px each."""
    out = np.empty((64, 192, 3), np.uint8)
    out[:, :64] = (128, 128, 128)
    out[:, 64:128] = (215, 40, 45)
    out[:, 128:] = (40, 185, 70)
    return out


def _centres(pixels: np.ndarray) -> np.ndarray:
    """Mean colour of the central 16x16 of each patch, float RGB 0-255."""
    return np.array([pixels[24:40, x + 24:x + 40, :3].reshape(-1, 3).mean(0) for x in (0, 64, 128)])


def _reference(colours: np.ndarray, icc: bytes) -> np.ndarray:
    transform = ImageCms.buildTransform(iccprofiles.load(icc), ImageCms.createProfile("sRGB"),
                                        "RGB", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    img = Image.fromarray(np.round(colours).astype(np.uint8)[None])
    return np.asarray(ImageCms.applyTransform(img, transform))[0].astype(float)


def _delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return deltaE_ciede2000(rgb2lab(a[None] / 255.0), rgb2lab(b[None] / 255.0))[0]


@pytest.fixture(scope="module", params=[(p, s) for p in sorted(SOURCE_PROFILES) for s in ("JPEG", "PNG")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tagged_source(request):
    name, fmt = request.param
    icc = SOURCE_PROFILES[name]()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    return icc, decode(_save(_patches(), fmt, icc_profile=icc, **kw))


@pytest.mark.parametrize("fmt", FORMATS)
def test_colour_keep_embeds_the_identical_profile(tagged_source, fmt):
    icc, src = tagged_source
    assert src.meta.icc == icc
    mask = np.full(src.rgb.shape[:2], 255, np.uint8)
    out = Output(render(src.full, mask, Deliverable(format=fmt, colour="keep"), src.meta), fmt)
    assert out.icc == icc
    assert np.abs(_centres(out.pixels) - _centres(src.rgb)).max() <= 3  # pixels untouched


@pytest.mark.parametrize("fmt", FORMATS)
def test_colour_srgb_converts_within_delta_e_2(tagged_source, fmt):
    icc, src = tagged_source
    mask = np.full(src.rgb.shape[:2], 255, np.uint8)
    out = Output(render(src.full, mask, Deliverable(format=fmt, colour="srgb"), src.meta), fmt)
    assert out.icc == srgb_profile()
    assert "sRGB" in ImageCms.getProfileDescription(iccprofiles.load(out.icc))
    source = _centres(src.rgb)
    expected = _reference(source, icc)
    assert _delta_e(source, expected).max() > 3  # the conversion matters (saturated red)
    assert _delta_e(_centres(out.pixels), expected).max() < 2


def _exact_adobe_to_srgb(rgb8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sRGB values (0-255 float) from the Adobe RGB maths, and which pixels are in gamut."""
    linear = (rgb8 / 255.0) ** iccprofiles.ADOBE_RGB_GAMMA
    xyz = linear @ iccprofiles.rgb_to_xyz_matrix(iccprofiles.ADOBE_RGB_PRIMARIES).T
    srgb_lin = xyz @ np.linalg.inv(iccprofiles.rgb_to_xyz_matrix(((0.64, 0.33), (0.30, 0.60),
                                                                  (0.15, 0.06)))).T
    inside = (srgb_lin.min(-1) >= 0) & (srgb_lin.max(-1) <= 1)
    encoded = np.where(srgb_lin <= 0.0031308, 12.92 * srgb_lin,
                       1.055 * np.clip(srgb_lin, 0, None) ** (1 / 2.4) - 0.055)
    return encoded * 255, inside


def test_to_srgb_16_bit_is_exact():
    icc = iccprofiles.adobe_rgb()
    rgb8 = photo("coffee")[::8, ::8]
    out8, prof8 = to_srgb(rgb8, icc)
    out16, prof16 = to_srgb(rgb8.astype(np.uint16) * 257, icc)
    assert out16.dtype == np.uint16 and prof16 == prof8 == srgb_profile()
    exact, inside = _exact_adobe_to_srgb(rgb8)
    assert inside.mean() > 0.8
    assert np.abs(out16 / 257.0 - exact)[inside].max() < 0.1  # 16-bit precision kept
    assert np.abs(out8 - exact)[inside].max() <= 1.0


def test_to_srgb_keeps_alpha_and_untagged_pixels():
    rgba = np.dstack([photo("coffee")[::8, ::8], np.arange(50 * 75).reshape(50, 75) % 256]).astype(np.uint8)
    out, _ = to_srgb(rgba, iccprofiles.display_p3())
    assert np.array_equal(out[..., 3], rgba[..., 3])
    assert not np.array_equal(out[..., :3], rgba[..., :3])
    same, prof = to_srgb(rgba, None)
    assert same is rgba and prof == srgb_profile()


def test_unusable_profile_is_a_colour_error():
    bad = bytearray(iccprofiles.adobe_rgb())
    bad[128:] = bytes(len(bad) - 128)  # a header with a zeroed tag table
    with pytest.raises(ColourError, match="unusable ICC profile"):
        to_srgb(np.zeros((2, 2, 3), np.uint8), bytes(bad))


def test_cmyk_profile_is_not_kept_for_rgb_pixels():
    cmyk_header = bytearray(iccprofiles.adobe_rgb())
    cmyk_header[16:20] = b"CMYK"
    img = Image.new("RGB", (4, 4))
    img.info["icc_profile"] = bytes(cmyk_header)
    assert extract(img).icc is None


# ------------------------------------------------------------------ metadata


def _meta_source() -> tuple[np.ndarray, bytes]:
    """A JPEG stored sideways (orientation 6) with EXIF, XMP and IPTC."""
    stored = np.ascontiguousarray(photo("astronaut")[::4, ::3])  # 128 x 171
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8298] = COPYRIGHT
    exif[0x013B] = "Jane Doe"  # Artist
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    data = _save(stored, "JPEG", quality=95, exif=exif.tobytes(), xmp=XMP,
                 icc_profile=iccprofiles.adobe_rgb(), extra=photoshop_iptc_segment(IPTC))
    return stored, data


@pytest.fixture(scope="module")
def meta_source():
    stored, data = _meta_source()
    return stored, decode(data)


def test_extract_reads_every_block(meta_source):
    _, src = meta_source
    meta = src.meta
    assert meta.icc == iccprofiles.adobe_rgb()
    assert meta.exif[:4] in (b"II*\x00", b"MM\x00*")
    exif = Image.Exif()
    exif.load(meta.exif)
    assert exif[0x0112] == 1 and exif[0x8298] == COPYRIGHT
    assert exif.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
    assert KEYWORD.encode() in meta.xmp and b'tiff:Orientation="1"' in meta.xmp
    assert meta.iptc == IPTC
    stripped = meta.stripped()
    assert stripped == SourceMeta(icc=meta.icc)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_keep(meta_source, fmt):
    stored, src = meta_source
    mask = np.full(src.rgb.shape[:2], 255, np.uint8)
    out = Output(render(src.full, mask, Deliverable(format=fmt), src.meta), fmt)
    assert out.pixels.shape[:2] == (171, 128)  # upright: stored 128 x 171 rotated clockwise
    upright = np.rot90(np.asarray(Image.open(io.BytesIO(_meta_source()[1])).convert("RGB")), -1)
    assert np.abs(out.pixels[..., :3].astype(int) - upright).mean() < 3
    assert out.exif[0x8298] == COPYRIGHT
    assert out.exif.get(0x0112, 1) == 1
    assert KEYWORD.encode() in out.xmp
    if fmt != "tiff":
        assert out.exif_ifd[0x9003] == "2024:05:06 07:08:09"
    if fmt in ("jpeg", "tiff"):
        assert out.iptc[(2, 25)] == KEYWORD.encode() and out.iptc[(2, 116)] == COPYRIGHT.encode()
    assert out.icc == iccprofiles.adobe_rgb()


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_strip(meta_source, fmt):
    _, src = meta_source
    mask = np.full(src.rgb.shape[:2], 255, np.uint8)
    data = render(src.full, mask, Deliverable(format=fmt, metadata="strip"), src.meta)
    out = Output(data, fmt)
    assert 0x8298 not in out.exif and not out.xmp and not out.iptc
    assert COPYRIGHT.encode() not in data and KEYWORD.encode() not in data
    assert out.icc == iccprofiles.adobe_rgb()  # colour, not metadata


def test_png_and_tiff_sources_carry_metadata():
    pixels = photo("coffee")[::8, ::8]
    exif = Image.Exif()
    exif[0x8298] = COPYRIGHT
    png = decode(_save(pixels, "PNG", exif=exif.tobytes(), pnginfo=_xmp_pnginfo()))
    assert KEYWORD.encode() in png.meta.xmp
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, photometric="rgb", metadata=None,
                     extratags=[(33432, "s", 0, COPYRIGHT, True), (700, 1, len(XMP), XMP, True),
                                (33723, 7, len(IPTC), IPTC, True)])
    tif = decode(buf.getvalue())
    for meta in (png.meta, tif.meta):
        parsed = Image.Exif()
        parsed.load(meta.exif)
        assert parsed[0x8298] == COPYRIGHT
        assert 273 not in parsed and 256 not in parsed  # no TIFF structure tags as EXIF
    assert KEYWORD.encode() in tif.meta.xmp and tif.meta.iptc == IPTC


def _xmp_pnginfo():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    return info


def test_corrupt_exif_is_dropped_not_fatal():
    img = Image.new("RGB", (4, 4))
    img.info["exif"] = b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8
    assert extract(img).exif is None
