"""Edge refinement (daemon/imaging/refine.py) on scenes with exact alpha, and its wiring:
the output keys, hits against misses, and near hits rendered from the new pixels.

The scenes composite a real photo (skimage) over a studio backdrop with a known alpha;
the "model's mask" is that alpha reduced to a working size and blurred as U^2-Net's
upscaled 320 px output is, so the test knows what the edge should have been.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.helpers import encode, photo, pipeline_over, png_alpha, render_legacy, write_config
from daemon import config as configmod
from daemon.cache.sqlite import SqliteStore
from daemon.config import OutputOptions
from daemon.config.schema import Deliverable
from daemon.imaging.decode import decode
from daemon.imaging.refine import refine, upscale
from daemon.imaging.keys import targets

SIZE = (1500, 1000)  # full size; the working mask is a third of it, as 24 MP is to 2048 px
WORKING = (500, 333)


def _composite(alpha: np.ndarray, subject: np.ndarray, seed: int = 0) -> np.ndarray:
    """alpha * subject over a grey sweep, with mild sensor noise (uint8 RGB)."""
    h, w = alpha.shape
    sweep = np.linspace(0.62, 0.7, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 3))
    img = alpha[..., None] * subject + (1 - alpha[..., None]) * sweep
    img += np.random.default_rng(seed).normal(0, 1.2 / 255, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _coffee() -> np.ndarray:
    img = Image.fromarray(photo("coffee")).resize(SIZE, Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) / 255


def _model_like(alpha: np.ndarray, blur: float, working=WORKING) -> np.ndarray:
    """The working-size mask a model gives: ``alpha`` reduced, then softened."""
    img = Image.fromarray(np.rint(alpha * 255).astype(np.uint8))
    img = img.resize(working, Image.Resampling.BOX)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(blur)) if blur else img)


def _partial_px_per_outline_px(mask: np.ndarray, alpha: np.ndarray) -> float:
    from skimage.measure import perimeter

    return float(((mask > 25) & (mask < 230)).sum() / perimeter(alpha >= 0.5))


def _mae(mask: np.ndarray, alpha: np.ndarray) -> float:
    return float(np.abs(mask / 255 - alpha).mean())


# A third of the size: refined tile by tile, as a camera file; the full size (a photo of
# at most 2048 px): in one pass. The blur is in working pixels, so the band is ~20 px in both.
PATHS = pytest.mark.parametrize("working,scale", [(WORKING, 1), (SIZE, 3)],
                                ids=["tiles", "one-pass"])


@PATHS
def test_refinement_sharpens_a_known_hard_edge(working, scale):
    w, h = SIZE
    s = 4  # drawn at 4x and box-filtered: exact fractional coverage on the outline
    big = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(big).rounded_rectangle((430 * s, 180 * s, 1070 * s, 880 * s),
                                          radius=120 * s, fill=255)
    alpha = np.asarray(big.resize(SIZE, Image.Resampling.BOX), np.float32) / 255
    rgb = _composite(alpha, _coffee())
    mask = _model_like(alpha, blur=2.5 * scale, working=working)

    plain, sharp = upscale(mask, w, h), refine(rgb, mask)
    soft = _partial_px_per_outline_px(plain, alpha)
    assert soft > 15  # the soft band the model leaves, ~20 px as at 24 MP
    assert _partial_px_per_outline_px(sharp, alpha) < 0.25 * soft  # 3.8 px, most of it
    # where the cup's cream rim meets the grey backdrop: a third colour in the band
    assert _mae(sharp, alpha) < 0.5 * _mae(plain, alpha)
    subject, truth = sharp >= 128, alpha >= 0.5
    assert (subject & truth).sum() / (subject | truth).sum() > 0.995


@PATHS
def test_a_soft_edge_stays_soft(working, scale):
    """A disc whose alpha is itself a wide ramp (defocus, a feathered edge) is not hardened."""
    w, h = SIZE
    disc = Image.new("L", SIZE, 0)
    ImageDraw.Draw(disc).ellipse((450, 200, 1050, 800), fill=255)
    alpha = np.asarray(disc.filter(ImageFilter.GaussianBlur(10)), np.float32) / 255
    red = np.broadcast_to(np.array([0.75, 0.2, 0.15], np.float32), (h, w, 3))
    rgb = _composite(alpha, red)
    mask = _model_like(alpha, blur=0, working=working)  # the model got this edge right

    out = refine(rgb, mask)
    ramp = (alpha > 0.05) & (alpha < 0.95)
    assert ramp.sum() > 20000
    assert np.abs(out[ramp] / 255 - alpha[ramp]).mean() < 0.03
    # still a ramp: as many partial pixels as the truth has, give or take a fifth
    partial = ((out > 12) & (out < 243)).sum()
    assert 0.8 * ramp.sum() < partial < 1.2 * ramp.sum()


def test_a_mask_with_no_uncertain_band_is_left_alone():
    rgb = photo("chelsea")
    h, w = rgb.shape[:2]
    for mask in (np.zeros((h, w), np.uint8), np.full((h // 3, w // 3), 255, np.uint8)):
        assert np.array_equal(refine(rgb, mask), upscale(mask, w, h))
    with pytest.raises(ValueError, match="refine must be one of none, edges"):
        refine(rgb, np.zeros((h, w), np.uint8), "guided")


def test_refine_keys_the_outputs_not_the_mask():
    """Toggling refine re-renders from the cached working mask: it is no part of the mask key."""
    def key(options, outputs=()):
        return targets("mask-key", options, outputs)[0].output_key

    edges, none = OutputOptions(refine="edges"), OutputOptions(refine="none")
    assert edges.mask_options == none.mask_options
    assert key(edges) != key(none)
    jpeg = Deliverable(name="web", format="jpeg")
    assert key(edges, (jpeg,)) != key(none, (jpeg,))  # the pair's mode keys its deliverables
    pinned = dataclasses.replace(jpeg, refine="none")
    assert key(edges, (pinned,)) == key(none, (pinned,))  # a deliverable's own mode wins
    assert targets("mask-key", edges, (pinned, jpeg))[0].refine == "none"
    assert targets("mask-key", edges, (pinned, jpeg))[1].refine == "edges"


def test_hits_match_misses_and_near_hits_refine_the_new_pixels(
        tmp_path, models_dir, shared_engines, inferences):
    """One cache, three configs: refine edges, none, and edges again after a reload."""
    stores = []

    def pipeline(name: str, refine_mode: str):
        base = tmp_path / name
        base.mkdir()
        cfg = configmod.load(write_config(base, models_dir, output={"refine": refine_mode},
                                          cache={"dir": str(tmp_path / "cache")}))
        stores.append(SqliteStore(cfg.cache.dir))
        return pipeline_over(cfg, shared_engines, stores[-1]), cfg.output_defaults

    try:
        rgb = photo("chelsea")  # 451 x 300: the working mask is the full-size mask
        original = encode(rgb, "JPEG", quality=92)
        edges, opts = pipeline("edges", "edges")
        miss = render_legacy(edges, original, opts)
        assert miss.tier == "miss" and len(inferences) == 1

        plain, plain_opts = pipeline("none", "none")
        toggled = render_legacy(plain, original, plain_opts)  # the cached mask, re-rendered
        assert len(inferences) == 1
        cached_mask = png_alpha(toggled.files[""])  # refine none at this size: the mask itself
        pixels = decode(original).rgb
        assert np.array_equal(png_alpha(miss.files[""]), refine(pixels, cached_mask))
        assert not np.array_equal(cached_mask, png_alpha(miss.files[""]))

        again, _ = pipeline("again", "edges")
        lossless = encode(pixels, "PNG")  # the same pixels in other bytes: a pixel hit
        hit = render_legacy(again, lossless, opts)
        assert hit.tier == "pixel" and len(inferences) == 1
        assert np.array_equal(png_alpha(hit.files[""]), png_alpha(miss.files[""]))
        exact = render_legacy(again, original, opts)
        assert exact.tier == "exact" and exact.files[""] == miss.files[""]

        reencoded = encode(pixels, "JPEG", quality=80)
        near = render_legacy(again, reencoded, opts)
        assert near.tier == "near" and len(inferences) == 1
        new_pixels = decode(reencoded).rgb
        assert np.array_equal(png_alpha(near.files[""]), refine(new_pixels, cached_mask))
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("size,working", [((1, 1), (1, 1)), ((7, 3), (7, 3)),
                                          ((3, 4000), (2, 2048)), ((9000, 5), (2048, 1))])
def test_tiny_and_extreme_shapes(size, working):
    """Any decodable image gets a mask of its own size (no file fails in refinement)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (working[1], working[0]), dtype=np.uint8)
    out = refine(rgb, mask)
    assert out.shape == rgb.shape[:2] and out.dtype == np.uint8


def test_the_sure_subject_is_opaque_and_the_sure_backdrop_clear(shared_engines):
    """U^2-Net's subject tops out below 255 (a dark page shows through it) and its
    backdrop keeps a faint haze; refined, both are exact, while the band stays solved."""
    from daemon.imaging.refine import BG_SURE, FG_SURE

    w, h = SIZE
    disc = Image.new("L", SIZE, 0)
    ImageDraw.Draw(disc).ellipse((400, 150, 1100, 850), fill=255)
    alpha = np.asarray(disc, np.float32) / 255
    rgb = _composite(alpha, _coffee())
    mask = np.asarray(Image.fromarray(shared_engines.mask("u2netp").predict(rgb)).resize(
        WORKING, Image.Resampling.BILINEAR))
    plain, out = upscale(mask, w, h), refine(rgb, mask)
    inside = np.asarray(disc.filter(ImageFilter.MinFilter(61))) > 0  # 30 px in from the edge
    outside = np.asarray(disc.filter(ImageFilter.MaxFilter(61))) == 0
    def far_into(region):  # 2 working px inside a region of the working mask, at full size
        core = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).filter(
            ImageFilter.MinFilter(5)))
        return upscale(core, w, h) == 255

    sure, clear = far_into(mask >= FG_SURE), far_into(mask <= BG_SURE)
    assert (inside & sure).sum() > 100_000 and (outside & clear).sum() > 100_000
    assert (plain[inside & sure] < 255).mean() > 0.5  # the model's own levels
    assert (out[inside & sure] == 255).all()
    assert _mae(out, alpha) < _mae(plain, alpha) / 2
    # a haze of a few levels over the backdrop, as on the camera files of bench/camera.py
    hazy = mask + ((mask <= 4) * 4).astype(np.uint8)
    assert (upscale(hazy, w, h)[outside & clear] == 4).mean() > 0.9
    assert (refine(rgb, hazy)[outside & clear] == 0).all()
