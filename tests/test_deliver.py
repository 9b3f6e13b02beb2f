"""Deliverables: geometry, bit depth, formats and backgrounds, checked on real files."""
from __future__ import annotations

import dataclasses
import io

import imagecodecs
import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from scipy import ndimage

import iccprofiles
from tests.helpers import cut_from, photo
from daemon.config.schema import Canvas, Deliverable
from daemon.imaging.colour import srgb_profile
from daemon.imaging.decode import decode
from daemon.imaging import deliver, rgba
from daemon.imaging.deliver import flatten, render
from daemon.imaging.geometry import (canvas_size, crop_box, limit_size, place_on_canvas, resize,
                                     subject_box)
from daemon.imaging.meta import SourceMeta
from daemon.imaging.png import encode_png

NO_META = SourceMeta()

# A 1000 x 800 scene: the subject is a 400 x 300 rectangle at (150, 200), plus specks.
SUBJECT = (150, 200, 550, 500)


def _scene_mask(specks: bool = True) -> np.ndarray:
    mask = np.zeros((800, 1000), np.uint8)
    x0, y0, x1, y1 = SUBJECT
    mask[y0:y1, x0:x1] = 255
    mask[y0 - 3:y0, x0:x1] = 20  # a faint halo under the 10% threshold
    if specks:
        mask[20, 20] = 255
        mask[790:792, 980:983] = 200  # 6 px
        mask[700:710, 900:910] = 128  # 100 px < 0.1% of 120 000
    return mask


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.fromarray(photo("chelsea")).resize((1000, 800)))
    return rgb, _scene_mask()


def _alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha >= 128)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ------------------------------------------------------------------ subject box


def test_subject_box_ignores_specks_and_faint_halo():
    assert subject_box(_scene_mask()) == SUBJECT


def test_subject_box_keeps_a_part_bigger_than_a_speck():
    mask = _scene_mask()
    mask[600:615, 800:815] = 255  # 225 px > 0.1% of the subject: a real part (a strap, a lace)
    assert subject_box(mask) == (150, 200, 815, 615)


def test_subject_box_threshold_is_ten_percent():
    mask = np.zeros((50, 50), np.uint8)
    mask[10:20, 10:20] = 26
    mask[10:20, 20:30] = 25
    assert subject_box(mask) == (10, 10, 20, 20)


@pytest.mark.parametrize("cx,cy,r", [(300, 200, 120), (101, 333, 77)])
def test_subject_box_of_a_disk(cx, cy, r):
    yy, xx = np.mgrid[:500, :500]
    mask = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8) * 255
    box = subject_box(mask)
    assert np.abs(np.subtract(box, (cx - r, cy - r, cx + r + 1, cy + r + 1))).max() <= 1


def test_subject_box_empty_is_none():
    assert subject_box(np.zeros((30, 40), np.uint8)) is None
    assert subject_box(np.full((30, 40), 25, np.uint8)) is None


# ------------------------------------------------------------------ crop


def test_crop_box_percent_px_and_clamping():
    assert crop_box(SUBJECT, 10, "%", (1000, 800)) == (110, 160, 590, 540)  # 10% of 400 = 40
    assert crop_box(SUBJECT, 25, "px", (1000, 800)) == (125, 175, 575, 525)
    assert crop_box(SUBJECT, 0, "%", (1000, 800)) == SUBJECT
    assert crop_box(SUBJECT, 300, "px", (1000, 800)) == (0, 0, 850, 800)
    with pytest.raises(ValueError, match="unit"):
        crop_box(SUBJECT, 1, "cm", (1000, 800))
    with pytest.raises(ValueError, match="negative"):
        crop_box(SUBJECT, -1, "px", (1000, 800))


@pytest.mark.parametrize("margin,unit,size", [(0, "%", (400, 300)), (10, "%", (480, 380)),
                                              (25, "px", (450, 350))])
def test_render_crops_to_subject_with_margin(scene, margin, unit, size):
    rgb, mask = scene
    spec = Deliverable(crop="subject", margin=margin, margin_unit=unit)
    img = _open(render(rgb, mask, spec, NO_META))
    assert img.mode == "RGBA" and img.size == size
    alpha = np.asarray(img)[..., 3]
    pad = (size[0] - 400) // 2
    assert _alpha_box(alpha) == (pad, pad, pad + 400, pad + 300)
    x0, y0 = SUBJECT[0] - pad, SUBJECT[1] - pad
    assert np.array_equal(np.asarray(img)[..., :3],
                          cut_from(rgb[y0:y0 + size[1], x0:x0 + size[0]], alpha))


# ------------------------------------------------------------------ canvas


def test_canvas_size():
    assert canvas_size((1, 1), 2000) == (2000, 2000)
    assert canvas_size((4, 5), 1000) == (800, 1000)
    assert canvas_size((16, 9), 1600) == (1600, 900)


@pytest.mark.parametrize("aspect,long_edge,fill,expected", [
    # width-bound: 400 -> 0.85 * 1000 = 850, 300 -> 637.5
    ((1, 1), 1000, 0.85, (75, 181, 925, 819)),
    # 4:5 canvas 800 x 1000: min(0.85 * 800 / 400, 0.85 * 1000 / 300) = 1.7 -> 680 x 510
    ((4, 5), 1000, 0.85, (60, 245, 740, 755)),
    # 3:1 canvas 900 x 300: height-bound, 0.5 * 300 / 300 = 0.5 -> 200 x 150
    ((3, 1), 900, 0.5, (350, 75, 550, 225)),
])
def test_canvas_fill_and_centring(scene, aspect, long_edge, fill, expected):
    rgb, mask = scene
    spec = Deliverable(crop="subject", canvas=Canvas(aspect=aspect, long_edge=long_edge, fill=fill))
    img = _open(render(rgb, mask, spec, NO_META))
    assert img.size == canvas_size(aspect, long_edge)
    box = _alpha_box(np.asarray(img)[..., 3])
    assert np.abs(np.subtract(box, expected)).max() <= 1, box


def test_canvas_without_crop_fits_the_whole_frame(scene):
    rgb, mask = scene
    spec = Deliverable(canvas=Canvas(aspect=(1, 1), long_edge=500, fill=1.0))
    img = _open(render(rgb, mask, spec, NO_META))
    alpha = np.asarray(img)[..., 3]
    assert img.size == (500, 500)
    assert (alpha[:50] == 0).all() and (alpha[-50:] == 0).all()  # 1000x800 -> 500x400, centred


def test_place_on_canvas_rejects_bad_fill():
    with pytest.raises(ValueError, match="fill"):
        place_on_canvas(np.zeros((4, 4, 4), np.uint8), (1, 1), 100, 0.0)


# ------------------------------------------------------------------ max_size / resize


def test_max_size_downscales_only(scene):
    rgb, mask = scene
    assert _open(render(rgb, mask, Deliverable(max_size=250), NO_META)).size == (250, 200)
    assert _open(render(rgb, mask, Deliverable(max_size=4000), NO_META)).size == (1000, 800)
    assert limit_size(np.zeros((10, 20, 4), np.uint8), None).shape == (10, 20, 4)


def test_16_bit_resize_matches_pillows_8_bit_one():
    rgb = photo("astronaut")[::2, ::2]
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[40:200, 60:220] = 255
    rgba8 = np.dstack([rgb, alpha])
    rgba8[alpha == 0, :3] = (0, 255, 0)  # colour under transparency must not bleed in
    small8 = resize(rgba8, (100, 100))
    small16 = resize(rgba8.astype(np.uint16) * 257, (100, 100))
    assert small16.dtype == np.uint16 and small16.shape == (100, 100, 4)
    visible = small8[..., 3] > 64
    assert np.abs(small16[..., 3] / 257.0 - small8[..., 3]).max() <= 1.5
    assert np.abs(small16[visible, :3] / 257.0 - small8[visible, :3]).max() <= 3
    edge_green = small16[visible, 1].astype(int) - small16[visible, 0]
    assert edge_green.max() < 65535 * 0.6  # no green halo along the alpha edge


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt,background,mode", [
    ("png", None, "RGBA"), ("tiff", None, "RGBA"), ("webp", None, "RGBA"), ("jpeg", None, "RGB"),
    ("png", (20, 40, 60), "RGB"), ("webp", (255, 255, 255), "RGB"),
])
def test_format_modes(scene, fmt, background, mode):
    rgb, mask = scene
    data = render(rgb, mask, Deliverable(format=fmt, background=background), NO_META)
    img = _open(data)
    assert img.format == {"png": "PNG", "tiff": "TIFF", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert img.mode == mode and img.size == (1000, 800)
    if background is not None and fmt == "png":
        far = ndimage.distance_transform_edt(mask == 0) > 2
        assert (np.asarray(img)[far] == background).all()


def test_jpeg_is_pure_white_away_from_the_subject(scene):
    rgb, mask = scene
    img = _open(render(rgb, mask, Deliverable(format="jpeg", quality=85), NO_META))
    pixels = np.asarray(img).astype(int)
    far = ndimage.distance_transform_edt(mask == 0) > 32  # past 4:2:0 chroma ringing
    assert np.abs(pixels[far] - 255).max() <= 1
    inside = ndimage.binary_erosion(mask == 255, iterations=16)
    assert np.abs(pixels[inside] - rgb[inside]).mean() < 4  # the subject is still the photo


def test_flatten_rounds_exactly():
    px = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    assert flatten(px, (255, 255, 255)).tolist() == [[[255, 255, 255], [200, 100, 0],
                                                       [227, 177, 127]]]
    px16 = px.astype(np.uint16) * 257
    assert (flatten(px16, (255, 255, 255)) // 257).tolist() == [[[255, 255, 255], [200, 100, 0],
                                                                  [227, 177, 127]]]


def test_tiff_alpha_is_unassociated(scene):
    rgb, mask = scene
    data = render(rgb, mask, Deliverable(format="tiff", compression=6), NO_META)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        assert page.tags["ExtraSamples"].value == (2,)
        assert page.extrasamples == (tifffile.EXTRASAMPLE.UNASSALPHA,)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        pixels = page.asarray()
    assert np.array_equal(pixels[..., 3], mask)
    # unassociated: colour not premultiplied (and black under alpha 0)
    assert np.array_equal(pixels[..., :3], cut_from(rgb, mask))
    raw = render(rgb, mask, Deliverable(format="tiff", compression=0), NO_META)
    with tifffile.TiffFile(io.BytesIO(raw)) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.NONE


def test_marketplace_jpeg(scene):
    """JPEG on white, square, 2000 px, subject 85%, sRGB from an Adobe RGB source."""
    rgb, mask = scene
    meta = SourceMeta(icc=iccprofiles.adobe_rgb())
    spec = Deliverable(name="marketplace", format="jpeg", quality=90, crop="subject",
                       canvas=Canvas((1, 1), 2000, 0.85), colour="srgb")
    img = _open(render(rgb, mask, spec, meta))
    assert img.mode == "RGB" and img.size == (2000, 2000)
    assert img.info["icc_profile"] == srgb_profile()
    pixels = np.asarray(img).astype(int)
    # the same deliverable as a PNG shows where the subject went: 1700 x 1275, centred
    png = _open(render(rgb, mask, Deliverable(format="png", crop="subject",
                                              canvas=Canvas((1, 1), 2000, 0.85)), meta))
    alpha = np.asarray(png)[..., 3]
    assert np.abs(np.subtract(_alpha_box(alpha), (150, 362, 1850, 1637))).max() <= 1
    far = ndimage.distance_transform_edt(alpha == 0) > 32
    assert np.abs(pixels[far] - 255).max() <= 1
    assert np.abs(pixels[alpha == 255].mean(0) - 255).min() > 40  # the subject is there


# ------------------------------------------------------------------ bit depth


def _deep_source() -> np.ndarray:
    """A real photo at 16 bits, with low bytes that an 8-bit path would lose."""
    rgb = photo("coffee")[::4, ::4].astype(np.uint16) * 257
    noise = np.random.default_rng(3).integers(-100, 100, rgb.shape)
    return np.clip(rgb + noise, 0, 65535).astype(np.uint16)


def _tiff16(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, photometric="rgb")
    return buf.getvalue()


@pytest.mark.parametrize("source", ["tiff", "png"])
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_in_16_bit_out(source, fmt):
    deep = _deep_source()
    data = _tiff16(deep) if source == "tiff" else encode_png(deep)
    d = decode(data)
    assert d.full.dtype == np.uint16 and np.array_equal(d.full, deep)
    mask = np.zeros(deep.shape[:2], np.uint8)
    mask[10:90, 20:130] = 255
    mask[40:60, 60:70] = 77
    out = render(d.full, mask, Deliverable(format=fmt), d.meta)
    if fmt == "png":
        assert out[24] == 16  # IHDR bit depth
        pixels = imagecodecs.png_decode(out)
    else:
        with tifffile.TiffFile(io.BytesIO(out)) as tif:
            assert tif.pages.first.bitspersample == 16
            pixels = tif.pages.first.asarray()
    assert pixels.dtype == np.uint16 and pixels.shape == deep.shape[:2] + (4,)
    assert np.array_equal(pixels[..., 3], mask.astype(np.uint16) * 257)
    assert np.array_equal(pixels[..., :3], cut_from(deep, mask))


def test_16_bit_to_8_bit_formats_rounds():
    deep = _deep_source()
    mask = np.full(deep.shape[:2], 255, np.uint8)
    img = _open(render(deep, mask, Deliverable(format="webp", lossless=True), NO_META))
    expected = np.round(deep / 257.0)
    assert np.array_equal(np.asarray(img)[..., :3], expected)


def test_16_bit_canvas_and_srgb():
    deep = _deep_source()
    mask = np.zeros(deep.shape[:2], np.uint8)
    mask[20:80, 30:120] = 255
    spec = Deliverable(format="png", crop="subject", canvas=Canvas((1, 1), 200, 0.8), colour="srgb")
    out = render(deep, mask, spec, SourceMeta(icc=iccprofiles.display_p3()))
    pixels = imagecodecs.png_decode(out)
    assert pixels.dtype == np.uint16 and pixels.shape == (200, 200, 4)
    assert np.abs(np.subtract(_alpha_box(pixels[..., 3] >> 8), (20, 46, 180, 153))).max() <= 1
    assert _open(out).info["icc_profile"] == srgb_profile()


def test_mask_must_match(scene):
    rgb, _ = scene
    with pytest.raises(ValueError, match="does not match"):
        render(rgb, np.zeros((10, 10), np.uint8), Deliverable(), NO_META)


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp", "png16"])
def test_hidden_pixels_are_cleared_unless_kept(scene, fmt):
    """Under alpha 0 the photo's backdrop is not delivered (black, as rembg writes it), which
    also makes the file smaller; ``hidden: keep`` keeps the photo's own pixels there."""
    rgb, mask = scene
    full = rgb.astype(np.uint16) * 257 + 3 if fmt == "png16" else rgb
    spec = Deliverable(format=fmt.removesuffix("16"), lossless=fmt == "webp")
    cleared = render(full, mask, spec, NO_META)
    kept = render(full, mask, dataclasses.replace(spec, hidden="keep"), NO_META)
    hidden, shown = mask == 0, mask > 0
    assert hidden.mean() > 0.3 and shown.mean() > 0.1
    for data, clear in ((cleared, True), (kept, False)):
        if fmt == "png16":
            pixels = imagecodecs.png_decode(data)
        else:
            pixels = np.asarray(_open(data)) if fmt != "tiff" else tifffile.imread(io.BytesIO(data))
        assert np.array_equal(pixels[..., :3][shown], full[shown]), (fmt, clear)
        if clear and fmt == "webp":  # libwebp picks its own colours there: not the photo's
            assert np.abs(pixels[..., :3][hidden].astype(int) - full[hidden]).mean() > 20
        else:
            assert np.array_equal(pixels[..., :3][hidden], 0 * full[hidden] if clear
                                  else full[hidden]), (fmt, clear)
    assert len(cleared) < 0.8 * len(kept), (len(cleared), len(kept))


def test_hidden_applies_to_formats_with_alpha_only(tmp_path):
    from daemon import config as configmod

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"outputs": [{"name": "web", "format": "jpeg",
                                                 "hidden": "keep"}]}))
    with pytest.raises(configmod.ConfigError,
                       match=r"outputs\[0\]\.hidden: applies to png, tiff and webp only"):
        configmod.load(path)
    path.write_text(yaml.safe_dump({"outputs": [{"name": "m", "format": "png",
                                                 "hidden": "blur"}]}))
    with pytest.raises(configmod.ConfigError, match=r"outputs\[0\]\.hidden"):
        configmod.load(path)


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("view", ["contiguous", "cropped", "mirrored"])
@pytest.mark.parametrize("clear", [False, True])
def test_cutout_is_the_plain_rgba_stack_for_any_view_and_depth(depth, view, clear):
    """deliver.cutout (OpenCV's interleave, whole-pixel clear) gives exactly the stack
    numpy's definition gives: alpha x257 at 16 bits, every sample 0 under alpha 0."""
    rgb = photo("coffee")
    if depth == 16:
        rgb = rgb.astype(np.uint16) * 257 + np.arange(rgb.size, dtype=np.uint16).reshape(rgb.shape) % 251
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[60:340, 90:500] = np.linspace(0, 255, 410).astype(np.uint8)  # 0 on the left edge too
    full = {"contiguous": rgb, "cropped": rgb[50:350, 80:520], "mirrored": rgb[:, ::-1]}[view]
    m = {"contiguous": mask, "cropped": mask[50:350, 80:520], "mirrored": mask}[view]
    alpha = m.astype(rgb.dtype) * (257 if depth == 16 else 1)
    expected = np.dstack([full, alpha])
    if clear:
        expected[m == 0] = 0
    got = deliver.cutout(full, m, clear=clear)
    assert got.dtype == rgb.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    assert clear == bool((got[m == 0] == 0).all())  # the photo is not black there


def test_interleave_refuses_a_layout_it_cannot_fill():
    rgb = photo("coffee")
    with pytest.raises(ValueError, match="cannot interleave"):
        rgba.interleave(rgb, rgb[..., 0], np.empty(rgb.shape[:2] + (4,), np.uint16))
    with pytest.raises(ValueError, match="cannot interleave"):
        rgba.interleave(rgb, rgb[..., 0], np.empty(rgb.shape[:2] + (4,), np.uint8)[:, ::-1])
