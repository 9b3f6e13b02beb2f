"""The mask confidence score: real photos, real masks (u2netp's and exact ones)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from daemon.config import OutputOptions
from daemon.config.schema import ReviewConfig
from daemon.imaging import confidence
from daemon.imaging.render import predict_mask
from tests.helpers import photo

W, H = 900, 600
ROUTE_BELOW = ReviewConfig().min_confidence


def coverage(draw_fn) -> np.ndarray:
    """Anti-aliased coverage (uint8) drawn at 4x and box-reduced."""
    big = Image.new("L", (W * 4, H * 4), 0)
    draw_fn(ImageDraw.Draw(big), 4)
    return np.asarray(big.resize((W, H), Image.Resampling.BOX))


def bottle_shape(d, s):
    d.rounded_rectangle((380 * s, 150 * s, 520 * s, 520 * s), radius=40 * s, fill=255)
    d.rectangle((425 * s, 70 * s, 475 * s, 160 * s), fill=255)


def studio_shot(alpha: np.ndarray, texture: str = "coffee") -> np.ndarray:
    """A photo-textured subject composited on a smooth grey sweep."""
    subject = np.asarray(Image.fromarray(photo(texture)).resize((W, H)), np.float32)
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    sweep = np.broadcast_to(170 + 40 * y, (H, W, 3))
    a = alpha.astype(np.float32)[..., None] / 255
    return np.clip(np.rint(a * subject + (1 - a) * sweep), 0, 255).astype(np.uint8)


def busy_shot(alpha: np.ndarray) -> np.ndarray:
    """A plain light subject in front of a photo (not a studio sweep): u2netp takes part
    of the backdrop for subject (IoU about 0.6); tests/test_review.py routes it."""
    a = alpha.astype(np.float32)[..., None] / 255
    backdrop = np.asarray(Image.fromarray(photo("astronaut")).resize((W, H)), np.float32)
    return np.rint(a * 200 + (1 - a) * backdrop).astype(np.uint8)


def glass_shot(alpha: np.ndarray, see_through: float = 0.6) -> np.ndarray:
    """The bottle as tinted glass on the grey sweep: the sweep shows through its body."""
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    sweep = np.broadcast_to(120 + 100 * y, (H, W, 3))
    tint = np.array([200, 225, 235], np.float32)
    body = (1 - see_through) * tint + see_through * sweep
    a = alpha.astype(np.float32)[..., None] / 255
    return np.clip(np.rint(a * body + (1 - a) * sweep), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bottle():
    alpha = coverage(bottle_shape)
    return alpha, studio_shot(alpha)


def test_a_clean_mask_on_a_real_photo_scores_high(bottle):
    alpha, rgb = bottle
    c = confidence.score(alpha, rgb)
    assert c.score >= 0.9, c
    assert c.reasons == ()
    assert 0.05 < c.signals.area < 0.2 and c.signals.pieces == 1 and c.signals.sides == ()


def test_the_models_own_mask_of_a_clean_shot_scores_above_the_routing_threshold(
        bottle, shared_engines):
    alpha, rgb = bottle
    mask = predict_mask(shared_engines.mask("u2netp"), rgb, OutputOptions())
    assert ((mask >= 128) == (alpha >= 128)).mean() > 0.97  # the model did find the bottle
    assert confidence.score(mask, rgb).score >= ROUTE_BELOW


def test_fragments_lower_the_score(bottle):
    alpha, rgb = bottle
    blobs = coverage(lambda d, s: [d.ellipse(((60 + 150 * i) * s, 480 * s, (130 + 150 * i) * s,
                                                560 * s), fill=255) for i in range(2)])
    c = confidence.score(np.maximum(alpha, blobs), rgb)
    assert c.score < ROUTE_BELOW
    assert c.signals.pieces == 3 and "3 pieces" in c.reasons[0]


def test_a_subject_cut_by_the_frame_on_several_sides_scores_low(bottle):
    _, rgb = bottle
    wide = coverage(lambda d, s: d.rectangle((0, 0, W * s, 300 * s), fill=255))
    c = confidence.score(wide, rgb)
    assert set(c.signals.sides) == {"top", "left", "right"}
    assert c.score < ROUTE_BELOW
    assert any("cut by the frame" in r for r in c.reasons)


def test_a_mostly_uncertain_mask_scores_low(bottle):
    alpha, rgb = bottle
    soft = np.asarray(Image.fromarray(alpha).filter(ImageFilter.GaussianBlur(25)))
    c = confidence.score(soft, rgb)
    assert c.signals.uncertain > 0.5
    assert c.score < 0.2 and "uncertain alpha" in c.reasons[0]


def test_empty_and_full_masks_score_zero(bottle):
    _, rgb = bottle
    empty = confidence.score(np.zeros((H, W), np.uint8), rgb)
    assert empty.score == 0.0 and empty.reasons == ("empty mask",)
    full = confidence.score(np.full((H, W), 255, np.uint8), rgb)
    assert full.score == 0.0 and full.reasons == ("everything is subject",)


def test_an_opaque_mask_over_a_see_through_subject_scores_lower(bottle):
    """Glass: u2netp's clean opaque mask; only the image shows the backdrop through it."""
    alpha, rgb = bottle
    opaque, glass = confidence.score(alpha, rgb), confidence.score(alpha, glass_shot(alpha))
    assert opaque.signals.see_through < 0.2 < 0.8 < glass.signals.see_through
    assert glass.score < ROUTE_BELOW <= opaque.score
    assert "shows through" in glass.reasons[0]


def test_a_mask_whose_edge_is_not_on_an_image_edge_scores_low(bottle):
    """A blob of plain backdrop taken for subject: nothing in the image where its edge is."""
    alpha, rgb = bottle
    blob = coverage(lambda d, s: d.ellipse((80 * s, 200 * s, 300 * s, 450 * s), fill=255))
    on_edge, off_edge = confidence.score(alpha, rgb), confidence.score(blob, rgb)
    assert off_edge.signals.edge < 2 and on_edge.signals.edge > 8
    assert off_edge.score < ROUTE_BELOW
    assert any("edge off the image" in r for r in off_edge.reasons)


def test_the_score_is_deterministic_and_independent_of_the_working_size(bottle):
    alpha, rgb = bottle
    first = confidence.score(alpha, rgb)
    assert confidence.score(alpha.copy(), rgb.copy()) == first
    big = np.asarray(Image.fromarray(alpha).resize((W * 2, H * 2), Image.Resampling.BILINEAR))
    assert confidence.score(big, rgb).score == pytest.approx(first.score, abs=0.05)


def test_without_the_image_only_the_mask_signals_count(bottle):
    alpha, _ = bottle
    c = confidence.score(alpha)
    assert c.signals.see_through is None and c.signals.edge is None and c.score >= 0.9


def test_a_reason_never_names_more_than_all_of_the_subject():
    """A thin subject in a wide soft band: the band can exceed the subject's own area."""
    mask = np.zeros((400, 400), np.uint8)
    mask[:, 195:205] = 255  # a 10 px pole...
    mask[:, 150:195] = mask[:, 205:250] = 110  # ...in a 90 px band of uncertain alpha
    c = confidence.score(mask)
    uncertain = [r for r in c.reasons if r.startswith("uncertain alpha")]
    assert uncertain and "%" not in uncertain[0] and "x the subject's area" in uncertain[0]
