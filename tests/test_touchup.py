"""Touch-up: strokes -> a corrected alpha (pure), and the correction's precedence in the
cache (a real SQLite store, a real model): re-drop, re-encode and revert."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from daemon.imaging import touchup
from daemon.imaging.touchup import Stroke, StrokeError, parse_strokes
from tests.helpers import encode, photo, pipeline_over, png_alpha, render_legacy, write_config


def disc_scene(size=600, radius=180, soft=3.0):
    """A red disc on a grey sweep with an anti-aliased edge ``soft`` px wide: the image,
    its true alpha, and a model's mask that is 25 px too big (it took in the backdrop)."""
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(xx - size / 2, yy - size / 2)
    true = np.clip((radius - d) / soft + 0.5, 0, 1)
    fg, bg = np.array([200, 40, 30], float), np.array([128, 128, 128], float)
    rng = np.random.default_rng(0)
    rgb = true[..., None] * fg + (1 - true[..., None]) * bg + rng.normal(0, 1.5, (size, size, 3))
    too_big = (np.clip((radius + 25 - d) / soft + 0.5, 0, 1) * 255).astype(np.uint8)
    return np.clip(rgb, 0, 255).astype(np.uint8), (true * 255).astype(np.uint8), too_big


def test_parse_strokes_refuses_bad_input_by_name():
    ok = parse_strokes([{"mode": "remove", "radius": 5, "points": [[1, 2], [3.5, 4]]}])
    assert ok == [Stroke("remove", 5.0, ((1.0, 2.0), (3.5, 4.0)))]
    for bad, why in (([], "non-empty"), ([{"mode": "erase", "radius": 5, "points": [[0, 0]]}],
                                         "mode"),
                     ([{"mode": "keep", "radius": 0, "points": [[0, 0]]}], "radius"),
                     ([{"mode": "keep", "radius": True, "points": [[0, 0]]}], "radius"),
                     ([{"mode": "keep", "radius": 3, "points": [[0]]}], "points"),
                     ([{"mode": "keep", "radius": 3, "points": [["a", 1]]}], "points"),
                     ("x", "list")):
        with pytest.raises(StrokeError, match=why):
            parse_strokes(bad)


def test_a_remove_stroke_clears_inside_and_leaves_every_other_pixel_alone():
    rgb, true, _ = disc_scene()
    alpha = true.copy()
    stroke = Stroke("remove", 30.0, ((260.0, 300.0), (340.0, 300.0)))  # across the disc's core
    out = touchup.apply(rgb, alpha, [stroke])
    inside = touchup.paint([stroke], 600, 600) > 0
    reach = touchup.paint([stroke], 600, 600, grow=touchup.REACH) > 0
    core = touchup.paint([Stroke("remove", 30.0 - 2 * touchup.REACH, stroke.points)], 600, 600) > 0
    assert out[core].max() <= 8  # removed
    assert (out[~reach] == alpha[~reach]).all()  # to the bit outside the brush's reach
    assert inside.sum() > 4000 and (alpha[inside] > 240).all()  # it was subject before


def test_a_stroke_along_an_edge_follows_the_photo_not_the_brush():
    """The model's mask took in a 25 px ring of backdrop; a remove stroke over the ring
    whose inner side lies a little inside the subject leaves the photo's soft edge, not
    a hard cut along the brush."""
    rgb, true, too_big = disc_scene()
    # a vertical stroke from x=477 to x=529 (radius 26) around x=503: the right edge of
    # the disc is at x=480, so the brush's inner side cuts 3 px into the subject
    stroke = Stroke("remove", 26.0, ((503.0, 270.0), (503.0, 330.0)))
    out = touchup.apply(rgb, too_big, [stroke])
    rows = slice(285, 316)
    band = slice(472, 490)  # across the true edge and the brush's side
    err_new = np.abs(out[rows, band].astype(int) - true[rows, band]).mean()
    hard = too_big.copy()
    hard[touchup.paint([stroke], 600, 600) > 0] = 0  # what a plain eraser would leave
    err_hard = np.abs(hard[rows, band].astype(int) - true[rows, band]).mean()
    assert err_new < 12 and err_hard > 3 * err_new, (err_new, err_hard)
    soft = out[300, 474:486]
    assert ((soft > 20) & (soft < 235)).sum() >= 2  # an edge with coverage, like the photo's


def test_keep_then_remove_the_later_stroke_wins():
    labels = touchup.paint([Stroke("keep", 10, ((50, 50),)), Stroke("remove", 5, ((50, 50),))],
                           100, 100)
    assert labels[50, 50] == 2 and labels[50, 58] == 1 and labels[0, 0] == 0


def test_a_stroke_outside_the_image_changes_nothing():
    rgb, true, _ = disc_scene(200, 60)
    out = touchup.apply(rgb, true, [Stroke("remove", 5, ((-100, -100), (-50, -60)))])
    assert (out == true).all()


@pytest.mark.slow
def test_the_correction_wins_in_the_cache_until_it_is_reverted(tmp_path, models_dir,
                                                               shared_engines):
    from daemon import config as configmod
    from daemon.cache.sqlite import SqliteStore
    from daemon.pipeline import Plan

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipe = pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))
    rgb = photo("chelsea")
    jpeg = encode(rgb, "JPEG", quality=92)
    opts = cfg.output_defaults
    plan = Plan(opts)
    model = png_alpha(render_legacy(pipe, jpeg, opts).files[""])
    assert render_legacy(pipe, jpeg, opts).tier == "exact"  # stored outputs from now on

    stroke = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))  # over the cat's face
    touched = pipe.touch_up(jpeg, plan, [stroke])
    fixed = png_alpha(touched.files[""])
    inside = touchup.paint([Stroke("remove", 20.0 - 2 * touchup.REACH, stroke.points)], 451, 300) > 0
    reach = touchup.paint([stroke], 451, 300, grow=touchup.REACH) > 0
    assert model[inside].mean() > 200 and fixed[inside].max() <= 8
    assert (fixed[~reach] == model[~reach]).all()

    # re-dropped (same bytes): the correction, not the stored outputs of the model's mask
    again = render_legacy(pipe, jpeg, opts)
    assert (png_alpha(again.files[""]) == fixed).all() and not again.cache_writes
    # a re-encode of the same pixels (a PNG of the JPEG's decoded pixels): found by them
    from daemon.imaging.decode import decode

    same_pixels = encode(decode(jpeg).rgb, "PNG")
    assert (png_alpha(render_legacy(pipe, same_pixels, opts).files[""]) == fixed).all()
    # a second touch-up starts from the correction, not from the model's mask
    keep = Stroke("keep", 6.0, ((185.0, 155.0),))
    both = png_alpha(pipe.touch_up(jpeg, plan, [keep]).files[""])
    outside_keep = ~(touchup.paint([keep], 451, 300, grow=touchup.REACH) > 0)
    assert (both[outside_keep] == fixed[outside_keep]).all() and both[155, 185] > 200

    assert pipe.forget_correction(jpeg)
    assert (png_alpha(render_legacy(pipe, jpeg, opts).files[""]) == model).all()
    assert not pipe.forget_correction(jpeg)


@pytest.mark.slow
def test_the_next_touch_up_reuses_the_decoded_source_unless_the_correction_changed(
        tmp_path, models_dir, shared_engines, monkeypatch):
    """A second touch-up of the same source decodes nothing (the workbench holds it); when
    the stored correction is no longer the one the workbench holds (another daemon
    reverted it over a shared cache), the source is decoded again and the earlier stroke
    is gone: a stale alpha never overwrites the store's."""
    from daemon import config as configmod
    from daemon import pipeline as pipemod
    from daemon.cache.sqlite import SqliteStore
    from daemon.imaging.fingerprint import sha256_bytes
    from daemon.pipeline import Plan

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipe = pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))
    jpeg = encode(photo("chelsea"), "JPEG", quality=92)
    plan = Plan(cfg.output_defaults)
    model = png_alpha(render_legacy(pipe, jpeg, cfg.output_defaults).files[""])
    decodes = []
    real_decode = pipemod.decode
    monkeypatch.setattr(pipemod, "decode", lambda *a, **kw: decodes.append(1) or
                        real_decode(*a, **kw))

    first = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))
    second = Stroke("remove", 15.0, ((330.0, 200.0),))
    pipe.touch_up(jpeg, plan, [first])
    assert len(decodes) == 1 and pipe.workbench.holding
    both = png_alpha(pipe.touch_up(jpeg, plan, [second]).files[""])
    assert len(decodes) == 1  # the workbench's pixels, fingerprint and alpha
    core1 = touchup.paint([Stroke("remove", 20.0 - 2 * touchup.REACH, first.points)],
                          451, 300) > 0
    core2 = touchup.paint([Stroke("remove", 15.0 - 2 * touchup.REACH, second.points)],
                          451, 300) > 0
    assert both[core1].max() <= 8 and both[core2].max() <= 8 and model[core1].mean() > 200

    pipe.corrections.drop(sha256_bytes(jpeg))  # as another daemon's revert would
    third = png_alpha(pipe.touch_up(jpeg, plan, [second]).files[""])
    assert len(decodes) == 2  # stale: decoded again, from the model's mask
    assert (third[core1] == model[core1]).all() and third[core2].max() <= 8


@pytest.mark.slow
def test_a_touch_up_during_its_preparation_waits_for_it_and_decodes_nothing(
        tmp_path, models_dir, shared_engines, monkeypatch):
    """The item view prepares the source when a brush is picked; a touch-up that comes
    while that runs waits for it and uses its work (one decode in all), and gives the
    same file as a touch-up without any preparation."""
    import threading

    from daemon import config as configmod
    from daemon import pipeline as pipemod
    from daemon.cache.sqlite import SqliteStore
    from daemon.pipeline import Plan

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipe = pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))
    jpeg = encode(photo("chelsea"), "JPEG", quality=92)
    plan = Plan(cfg.output_defaults)
    render_legacy(pipe, jpeg, cfg.output_defaults)
    stroke = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))
    plain = pipe.touch_up(jpeg, plan, [stroke]).files[""]
    pipe.forget_correction(jpeg)

    decoding, release, decodes = threading.Event(), threading.Event(), []
    real_decode = pipemod.decode

    def held_decode(*a, **kw):
        decodes.append(1)
        decoding.set()
        assert release.wait(30)
        return real_decode(*a, **kw)
    monkeypatch.setattr(pipemod, "decode", held_decode)
    preparing = threading.Thread(target=pipe.prepare_touch_up, args=(jpeg, plan))
    preparing.start()
    assert decoding.wait(30)  # the preparation is decoding, held
    result = []
    touching = threading.Thread(target=lambda: result.append(pipe.touch_up(jpeg, plan,
                                                                          [stroke])))
    touching.start()
    touching.join(0.5)
    assert touching.is_alive() and len(decodes) == 1  # waiting, not decoding a second time
    release.set()
    preparing.join(30)
    touching.join(30)
    assert len(decodes) == 1 and result[0].files[""] == plain


def test_a_touch_up_of_a_studio_shot_keeps_its_detail_and_edge_colours(tmp_path, models_dir,
                                                                       shared_engines):
    """The touch-up starts from the alpha that was delivered (refined, with the detail
    stage's recovered structures) and its deliverables are despilled like any other: away
    from the stroke, the touched-up cutout equals the model's cutout in every channel."""
    from daemon import config as configmod
    from daemon.cache.sqlite import SqliteStore
    from daemon.pipeline import Plan
    from tests.test_detail import _studio

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipe = pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))
    rgb = _studio(size=(1500, 1000))[0]
    png = encode(rgb, "PNG")
    opts = cfg.output_defaults
    before = np.asarray(Image.open(io.BytesIO(render_legacy(pipe, png, opts).files[""])))
    partial = (before[..., 3] > 10) & (before[..., 3] < 245)
    assert partial.sum() > 500  # soft edges, strap and strands: despilled pixels
    assert (before[partial][:, :3] != rgb[partial]).any(axis=1).mean() > 0.5

    stroke = Stroke("remove", 30.0, ((750.0, 620.0), (800.0, 640.0)))  # inside the bag
    after = np.asarray(Image.open(io.BytesIO(
        pipe.touch_up(png, Plan(opts), [stroke]).files[""])))
    reach = touchup.paint([stroke], 1500, 1000, grow=touchup.REACH) > 0
    assert after[reach][:, 3].min() < 10 < before[reach][:, 3].max()  # the stroke took
    diff = np.abs(after[~reach].astype(int) - before[~reach].astype(int))
    assert diff.max() <= 1, diff.max()


@pytest.mark.slow
def test_a_touched_up_re_encode_of_a_cached_photo_is_delivered_again(tmp_path, models_dir,
                                                                     shared_engines):
    """The re-encode's own bytes and pixels are new to the cache: its edge colours' guide
    (the model's mask) is a near lookup, which embeds the photo."""
    from daemon import config as configmod
    from daemon.cache.sqlite import SqliteStore
    from daemon.pipeline import Plan

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipe = pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))
    rgb, opts = photo("chelsea"), cfg.output_defaults
    render_legacy(pipe, encode(rgb, "JPEG", quality=92), opts)
    again = encode(rgb, "JPEG", quality=80)
    stroke = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))  # over the cat's face
    touched = png_alpha(pipe.touch_up(again, Plan(opts), [stroke]).files[""])
    redone = render_legacy(pipe, again, opts)
    assert not redone.errors and redone.tier == "exact"
    assert (png_alpha(redone.files[""]) == touched).all()
