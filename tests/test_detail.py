"""The detail stage (daemon/imaging/detail.py) and despill (daemon/imaging/despill.py) on
generated studio shots with exact alpha, on real busy photos, and through the pipeline.

The 24 MP scene: a bag on a grey sweep with a 32 px strap arching over it and a fringe
of 3 px strands, a soft floor shadow under it and a dust speck apart from it. The
"model's mask" is the bag's body alone, reduced to the working size and softened, as
U^2-Net's 320 px mask is: it has none of the strap or the strands.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.helpers import encode, photo, pipeline_over, png_alpha, render_legacy, write_config
from daemon import config as configmod
from daemon.cache.sqlite import SqliteStore
from daemon.config.schema import Deliverable
from daemon.imaging import backdrop, deliver, despill, detail
from daemon.imaging.decode import decode
from daemon.imaging.geometry import subject_box
from daemon.imaging.matte import Matte
from daemon.imaging.meta import SourceMeta
from daemon.imaging.refine import refine

SIZE = (6000, 4000)
WORKING = (2048, 1365)
BODY_RGB = (0.42, 0.25, 0.14)
STRAP_RGB = (0.25, 0.14, 0.08)
STRAND_RGB = (0.62, 0.45, 0.28)


def _studio(size=SIZE, seed=0):
    """(rgb uint8, truth alpha, subject colour, parts) of the bag scene at ``size``."""
    w, h = size
    s = w / 6000
    rng = np.random.default_rng(seed)

    def px(*v):
        return tuple(int(round(x * s)) for x in v)

    body = np.zeros((h, w), np.uint8)
    cv2.rectangle(body, px(2200, 1800), px(3800, 3100), 255, -1)
    strap = np.zeros((h, w), np.uint8)
    cv2.ellipse(strap, px(3000, 1800), px(620, 700), 0, 180, 360, 255,
                thickness=max(2, round(32 * s)), lineType=cv2.LINE_AA)
    strands = np.zeros((h, w), np.uint8)
    for i in range(25):
        y = 2300 + 30 * i
        cv2.line(strands, px(2200, y), px(2200 - 350 - 6 * i, y + 120 + 4 * i), 255,
                 thickness=max(1, round(3 * s)), lineType=cv2.LINE_AA)
    a_body, a_strap, a_strands = (m.astype(np.float32) / 255 for m in (body, strap, strands))
    alpha = np.maximum(np.maximum(a_body, a_strap), a_strands)
    outside = a_body == 0
    parts = {"strap": np.where(outside, a_strap, 0), "strands": np.where(outside, a_strands, 0)}
    # the subject's colour: body, strap over it, strands over both
    colour = np.empty((h, w, 3), np.float32)
    for c in range(3):
        colour[..., c] = np.where(a_strands > 0, STRAND_RGB[c],
                                  np.where(a_strap > 0, STRAP_RGB[c], BODY_RGB[c]))
    # the backdrop: a grey sweep, a soft floor shadow under the bag, a dust speck far away
    sweep = np.linspace(0.86, 0.74, h, dtype=np.float32)[:, None]
    shadow = np.zeros((h, w), np.uint8)
    cv2.ellipse(shadow, px(3000, 3120), px(1100, 110), 0, 0, 360, 255, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 60 * s).astype(np.float32) / 255 * 0.45
    speck = np.zeros((h, w), np.uint8)
    cv2.circle(speck, px(900, 700), max(2, round(6 * s)), 255, -1)
    speck = speck.astype(np.float32) / 255
    bg = sweep * (1 - shadow) * (1 - 0.6 * speck)
    rgb = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        v = alpha * colour[..., c] + (1 - alpha) * bg
        v += rng.normal(0, 1.2 / 255, (h, w)).astype(np.float32)
        rgb[..., c] = np.clip(np.rint(v * 255), 0, 255)
    parts["shadow"] = (shadow > 0.05) & (alpha == 0)
    parts["speck"] = (speck > 0.5) & (alpha == 0)
    return rgb, alpha, colour, parts, a_body


def _model_like(body: np.ndarray, working=WORKING) -> np.ndarray:
    small = cv2.resize(np.rint(body * 255).astype(np.uint8), working, interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), 2.5)


@pytest.fixture(scope="module")
def bag():
    rgb, alpha, colour, parts, body = _studio()
    mask = _model_like(body)
    edges = refine(rgb, mask, "edges")
    bd = backdrop.fit(rgb, mask)
    found = detail.recover(rgb, mask, edges.copy(), bd)
    return dict(rgb=rgb, alpha=alpha, colour=colour, parts=parts, mask=mask, edges=edges,
                backdrop=bd, detail=found)


def _recall(out: np.ndarray, truth: np.ndarray) -> float:
    return float(np.minimum(out / 255, truth).sum() / truth.sum())


def test_a_strap_and_strands_are_recovered_at_24mp(bag):
    assert bag["backdrop"].plain
    for part in ("strap", "strands"):
        assert _recall(bag["edges"], bag["parts"][part]) < 0.5  # refine alone misses them
    assert _recall(bag["detail"], bag["parts"]["strap"]) >= 0.95
    assert _recall(bag["detail"], bag["parts"]["strands"]) >= 0.80
    # and the alpha is closer to the truth overall
    truth = bag["alpha"]
    assert np.abs(bag["detail"] / 255 - truth).mean() < 0.8 * np.abs(bag["edges"] / 255 - truth).mean()


def test_a_floor_shadow_and_a_speck_stay_out(bag):
    rgb, parts = bag["rgb"], bag["parts"]
    # both are plainly visible departures from the sweep ...
    sweep = bag["backdrop"].at(*np.nonzero(parts["speck"])[::-1])
    assert np.abs(rgb[parts["speck"]] - sweep).max(axis=1).mean() > 50
    assert rgb[parts["shadow"]].mean() < rgb[:1000].mean() - 20
    # ... that are not subject
    assert (bag["detail"][parts["shadow"]] / 255).mean() <= 0.02
    assert (bag["detail"][parts["speck"]] / 255).mean() <= 0.02


def _edge_error(rgb_out: np.ndarray, alpha_out: np.ndarray, truth, colour, background):
    """Mean |composite - true composite| over ``background`` (0-255 levels) on pixels of
    partial truth where the output's alpha is within 0.1 of it."""
    a = alpha_out.astype(np.float32) / 255
    part = (truth > 0) & (truth < 1) & (np.abs(a - truth) < 0.1)
    ys, xs = np.nonzero(part)
    assert len(ys) > 5000
    k = np.asarray(background, np.float32)
    ao, at = a[ys, xs, None], truth[ys, xs, None]
    out = ao * rgb_out[ys, xs].astype(np.float32) / 255 + (1 - ao) * k
    true = at * colour[ys, xs] + (1 - at) * k
    return float(np.abs(out - true).mean() * 255)


def test_edge_pixels_carry_the_subject_colour_over_magenta(bag):
    """Through the deliverable: the PNG's strips and a TIFF's cutout both carry it."""
    alpha = bag["detail"]
    patch = despill.foreground(bag["rgb"], alpha, bag["backdrop"])
    magenta = (1.0, 0.0, 1.0)
    plain = _edge_error(bag["rgb"], alpha, bag["alpha"], bag["colour"], magenta)
    assert plain > 12  # the backdrop's mix: a light halo over a saturated page
    # cropped to the subject: the patch follows the crop
    x0, y0, x1, y1 = subject_box(alpha)
    for spec in (Deliverable(name="cutout", format="png", crop="subject"),
                 Deliverable(name="master", format="tiff", compression=0, crop="subject")):
        out = _pixels(deliver.render(bag["rgb"], alpha, spec, SourceMeta(), patch))
        assert out.shape[:2] == (y1 - y0, x1 - x0)
        err = _edge_error(out[..., :3], out[..., 3], bag["alpha"][y0:y1, x0:x1],
                          bag["colour"][y0:y1, x0:x1], magenta)
        assert err <= 6, spec.format


def test_despill_keeps_the_source_bit_depth(bag):
    """16-bit pixels get 16-bit colours: the same solution, 257 times finer."""
    rgb = bag["rgb"][1500:2600, 1500:3000]
    alpha = bag["detail"][1500:2600, 1500:3000]
    mask = _model_like(bag["alpha"][1500:2600, 1500:3000], (1500, 1100))
    bd = backdrop.fit(rgb, mask)
    p8 = despill.foreground(rgb, alpha, bd)
    p16 = despill.foreground(rgb.astype(np.uint16) * 257, alpha, bd)
    assert p16.values.dtype == np.uint16 and np.array_equal(p8.flat, p16.flat)
    assert np.abs(p16.values / 257 - p8.values).max() <= 0.51


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_a_busy_photo_is_left_as_refine_makes_it(name):
    rgb = photo(name)
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 5, h // 3), 0, 0, 360, 255, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    matte = Matte(rgb, rgb, mask)
    assert matte.backdrop is not None and not matte.backdrop.plain
    alpha = matte.alpha("edges", True)
    assert np.array_equal(alpha, matte.alpha("edges", False))
    # despill still gives the edge its colour, estimated around it, and only there
    patch = matte.colours("edges", True)
    assert np.array_equal(patch.flat, np.flatnonzero((alpha >= despill.LOW) & (alpha <= despill.HIGH)))


def _busy_scene(w=1500, h=1000, seed=7):
    """(rgb uint8, exact alpha, subject colour): a green subject with a feathered outline
    and 3 px yellow strands, in front of a room (the coffee photo, not a sweep)."""
    rng = np.random.default_rng(seed)
    room = cv2.resize(photo("coffee"), (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    body = np.zeros((h, w), np.uint8)
    cv2.ellipse(body, (w // 2, h * 52 // 100), (w * 22 // 100, h * 28 // 100), 0, 0, 360, 255, -1)
    strands = np.zeros((h, w), np.uint8)
    for i in range(12):
        cv2.line(strands, (w * 28 // 100, h * 45 // 100 + 18 * i),
                 (w * 16 // 100 - 5 * i, h // 2 + 22 * i), 255, 3, cv2.LINE_AA)
    truth = np.maximum(cv2.GaussianBlur(body, (0, 0), 4), strands).astype(np.float32) / 255
    colour = np.empty((h, w, 3), np.float32)
    colour[:] = (0.3, 0.55, 0.2)
    colour[strands > 0] = (0.85, 0.8, 0.3)
    a = truth[..., None]
    rgb = np.clip(np.rint((a * colour + (1 - a) * room) * 255
                          + rng.normal(0, 1.2, (h, w, 3))), 0, 255).astype(np.uint8)
    return rgb, truth, colour


def test_on_a_busy_backdrop_edge_pixels_carry_the_subject_colour():
    """With the exact alpha (a retoucher's), the colours estimated around the edge
    composite over magenta far closer to the truth than the photo's mixed pixels, in 8
    and in 16 bits."""
    rgb, truth, colour = _busy_scene()
    alpha = np.rint(truth * 255).astype(np.uint8)
    matte = Matte.decided(rgb, rgb, alpha)
    assert not matte.backdrop.plain
    patch = matte.colours("edges", True)
    magenta = (1.0, 0.0, 1.0)
    plain = _edge_error(rgb, alpha, truth, colour, magenta)
    despilled = _edge_error(patch.onto(rgb.copy()), alpha, truth, colour, magenta)
    assert plain > 8, plain  # the room's mix: a halo over a saturated page
    assert despilled < 0.5 * plain and despilled <= 6, (despilled, plain)
    # a 16-bit source gets 16-bit colours: the same solution, finer
    deep = rgb.astype(np.uint16) * 257
    p16 = Matte.decided(rgb, deep, alpha).colours("edges", True)
    assert p16.values.dtype == np.uint16 and np.array_equal(p16.flat, patch.flat)
    assert np.abs(p16.values / 257 - patch.values).mean() < 0.5


def test_on_a_busy_photo_the_bytes_do_not_depend_on_opencv_threads_and_off_keeps_the_photo():
    """A busy photo's deliverables, rendered with 1 and with 2 OpenCV threads, are the same
    bytes (8-bit PNG, 16-bit TIFF); with despill off its partial pixels are the photo's."""
    rgb = photo("astronaut")
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 5, h // 3), 0, 0, 360, 255, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    deep = rgb.astype(np.uint16) * 257
    specs = (Deliverable(name="cutout", format="png"),
             Deliverable(name="master", format="tiff", compression=0))
    threads = cv2.getNumThreads()
    files = []
    try:
        for n in (1, 2):
            cv2.setNumThreads(n)
            out = []
            for full in (rgb, deep):
                matte = Matte(rgb, full, mask)
                patch = matte.colours("edges", True)
                assert patch is not None and len(patch.flat) > 1000
                out += [deliver.render(full, matte.alpha("edges", True), spec, SourceMeta(), patch)
                        for spec in specs]
            files.append(out)
    finally:
        cv2.setNumThreads(threads)
    assert files[0] == files[1]
    alpha = Matte(rgb, rgb, mask).alpha("edges", True)
    partial = (alpha >= despill.LOW) & (alpha <= despill.HIGH)
    on = _pixels(files[0][0])
    off = _pixels(deliver.render(rgb, alpha, specs[0], SourceMeta()))
    assert np.array_equal(off[..., :3][partial], rgb[partial])
    assert (on[..., :3][partial] != rgb[partial]).any(axis=1).mean() > 0.5


def test_hits_match_misses_at_any_opencv_thread_count_and_near_hits_use_new_pixels(
        tmp_path, models_dir, shared_engines, inferences):
    rgb = _studio((1500, 1000), seed=3)[0]
    original = encode(rgb, "PNG")
    stores = []

    def pipeline(name: str, **output):
        base = tmp_path / name
        base.mkdir()
        cfg = configmod.load(write_config(base, models_dir, output=output,
                                          cache={"dir": str(tmp_path / "cache")}))
        stores.append(SqliteStore(cfg.cache.dir))
        return pipeline_over(cfg, shared_engines, stores[-1]), cfg.output_defaults

    threads = cv2.getNumThreads()
    try:
        first, opts = pipeline("first")
        assert opts.detail and opts.despill  # on by default
        miss = render_legacy(first, original, opts)
        assert miss.tier == "miss" and len(inferences) == 1
        # toggled off: re-rendered from the cached mask, no new inference
        raw, raw_opts = pipeline("raw", refine="none", detail=False, despill=False)
        cached_mask = png_alpha(render_legacy(raw, original, raw_opts).files[""])
        assert len(inferences) == 1
        matte = Matte(rgb, rgb, cached_mask)
        want = matte.alpha("edges", True)
        assert np.array_equal(png_alpha(miss.files[""]), want)
        assert not np.array_equal(want, matte.alpha("edges", False))  # the stage acted
        cv2.setNumThreads(1)
        again, _ = pipeline("again")
        hit = render_legacy(again, encode(rgb, "PNG", compress_level=1), opts)  # other bytes
        assert hit.tier == "pixel" and len(inferences) == 1
        assert _pixels(hit.files[""]) .tobytes() == _pixels(miss.files[""]).tobytes()
        cv2.setNumThreads(threads)
        # a near hit (other pixels: re-encoded) finds the detail in its own pixels
        reencoded = encode(rgb, "JPEG", quality=85)
        near = render_legacy(again, reencoded, opts)
        assert near.tier == "near" and len(inferences) == 1
        new_pixels = decode(reencoded).rgb
        new = Matte(new_pixels, new_pixels, cached_mask)
        got = png_alpha(near.files[""])
        assert np.array_equal(got, new.alpha("edges", True))
        assert not np.array_equal(got, want)
        assert (got > new.alpha("edges", False)).sum() > 1000
    finally:
        cv2.setNumThreads(threads)
        for s in stores:
            s.close()


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))


def test_detail_and_despill_key_the_outputs_and_a_deliverable_wins(tmp_path, models_dir):
    """`detail: off` / `despill: off` in YAML (booleans), per pair and per deliverable; each
    keys the outputs (a toggle re-renders from the cached mask), never the mask."""
    import dataclasses

    from daemon.config import OutputOptions
    from daemon.imaging.keys import targets

    path = write_config(tmp_path, models_dir, output={"detail": False})
    text = path.read_text()
    assert "detail: false" in text
    path.write_text(text.replace("detail: false", "detail: off"))  # as a user writes it
    cfg = configmod.load(path)
    assert cfg.output_defaults.detail is False and cfg.output_defaults.despill is True
    on, off = OutputOptions(), OutputOptions(detail=False)
    nospill = OutputOptions(despill=False)
    assert on.mask_options == off.mask_options == nospill.mask_options
    keys = {targets("m", o, ())[0].output_key for o in (on, off, nospill)}
    assert len(keys) == 3
    web = Deliverable(name="web", format="webp")
    pinned = dataclasses.replace(web, detail=True, despill=False)
    assert targets("m", off, (web,))[0].detail is False  # the pair's default
    t = targets("m", off, (pinned,))[0]
    assert (t.detail, t.despill) == (True, False)
    assert t.output_key == targets("m", on, (pinned,))[0].output_key


def test_the_png_strips_and_the_cutout_carry_the_same_colours_through_srgb(bag):
    """The straight PNG writes the patch strip by strip, converted to sRGB on its own: the
    same file as the cutout with the patch in it, converted whole."""
    from iccprofiles import adobe_rgb

    y0, y1, x0, x1 = 2200, 2700, 1700, 2300
    rgb = np.ascontiguousarray(bag["rgb"][y0:y1, x0:x1])
    alpha = np.ascontiguousarray(bag["detail"][y0:y1, x0:x1])
    bd = backdrop.fit(bag["rgb"], bag["mask"])
    full = despill.foreground(bag["rgb"], bag["detail"], bd).cropped((x0, y0, x1, y1))
    assert len(full.flat) > 1000
    spec = Deliverable(name="cutout", format="png", colour="srgb")
    meta = SourceMeta(icc=adobe_rgb())
    straight = deliver.render(rgb, alpha, spec, meta, full)
    whole = deliver.encode(deliver.cutout(rgb, alpha, full, clear=True), spec, meta)
    assert straight == whole
    assert straight != deliver.render(rgb, alpha, spec, meta)


@pytest.mark.parametrize("size,working", [((1, 1), (1, 1)), ((7, 3), (7, 3)),
                                          ((3, 4000), (2, 2048)), ((9000, 5), (2048, 1)),
                                          ((40, 30), (40, 30))])
def test_tiny_and_extreme_shapes(size, working):
    """Any image gets its matte: a plain grey frame with a dark square in the middle."""
    w, h = size
    rgb = np.full((h, w, 3), 200, np.uint8)
    rgb[h // 3:max(h // 3 + 1, 2 * h // 3), w // 3:max(w // 3 + 1, 2 * w // 3)] = 40
    mask = cv2.resize((rgb[..., 0] < 100).astype(np.uint8) * 255, working,
                      interpolation=cv2.INTER_AREA)
    matte = Matte(rgb, rgb, mask)
    alpha = matte.alpha("edges", True)
    assert alpha.shape == (h, w) and alpha.dtype == np.uint8
    patch = matte.colours("edges", True)
    if patch is not None:
        assert patch.values.shape == (len(patch.flat), 3)


def test_the_backdrop_just_under_a_rounded_base_in_its_shadow_stays_out():
    """A round subject sitting in its floor shadow, which darkens away from it (the shadow
    is centred under the base): beside the base the sweep is lighter than the backdrop
    model, filled in from farther out. That lighter sweep of its own colour is not detail."""
    w, h = SIZE
    rng = np.random.default_rng(5)
    body = np.zeros((h, w), np.uint8)
    cv2.ellipse(body, (3000, 2300), (1050, 800), 0, 0, 360, 255, -1, lineType=cv2.LINE_AA)
    a_body = body.astype(np.float32) / 255
    shadow = np.zeros((h, w), np.uint8)
    cv2.ellipse(shadow, (3000, 3125), (1300, 130), 0, 0, 360, 255, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 156).astype(np.float32) / 255 * 0.5
    sweep = np.linspace(0.9, 0.8, h, dtype=np.float32)[:, None] * (1 - shadow)
    rgb = np.empty((h, w, 3), np.uint8)
    for c, v in enumerate(BODY_RGB):
        x = a_body * v + (1 - a_body) * sweep + rng.normal(0, 1.2 / 255, (h, w)).astype(np.float32)
        rgb[..., c] = np.clip(np.rint(x * 255), 0, 255)
    mask = _model_like(a_body)
    edges = refine(rgb, mask, "edges")
    found = detail.recover(rgb, mask, edges.copy(), backdrop.fit(rgb, mask))
    # the sweep within 60 px under the base, where the shadow is
    near = (cv2.dilate(body, np.ones((121, 121), np.uint8)) > 0) & (body == 0) & (shadow > 0.1)
    assert near.sum() > 20000
    assert (found[near] / 255).mean() <= 0.02
    # nor anywhere else on the sweep: a few hundred noise pixels at most
    assert ((found > edges.astype(np.int16) + 25) & (a_body == 0)).sum() < 1000
