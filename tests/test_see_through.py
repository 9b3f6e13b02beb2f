"""The see-through alpha (daemon/imaging/see_through.py, ``refine: glass``) on studio scenes
with exact alpha (bench/groundtruth.py) and on real photos with their model masks.

It must lower alpha inside a glass the model painted opaque, and change nothing on an
opaque subject: a product, a white box on white, an opaque matte cylinder lit by the
same light as the sweep (its interior follows the backdrop, undimmed by transparency),
real photos. A false transparency on a product is worse than an opaque glass.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import photo
from daemon.imaging import see_through
from daemon.imaging.refine import refine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import groundtruth as gt  # noqa: E402

SIZE = (900, 600)


def _opaque_mask(alpha: np.ndarray) -> np.ndarray:
    """What a mask model answers for a glass: the whole silhouette opaque, edges soft."""
    return cv2.GaussianBlur(np.where(alpha > 0.02, 255, 0).astype(np.uint8), (0, 0), 1.5)


def _mae(out: np.ndarray, alpha: np.ndarray) -> float:
    return float(np.abs(out / 255 - alpha).mean())


@pytest.mark.parametrize("seed", [1, 4])
def test_glass_gets_partial_alpha_where_the_sweep_shows_through(seed):
    sc = gt.scene("glass", seed, SIZE)
    mask = _opaque_mask(sc.alpha)
    edges, glass = refine(sc.rgb, mask, "edges"), refine(sc.rgb, mask, "glass")
    assert _mae(glass, sc.alpha) < 0.6 * _mae(edges, sc.alpha)
    body = (sc.alpha > 0.25) & (sc.alpha < 0.65)  # truth 0.3-0.6: the tumbler's body
    lowered = body & (glass < 200)
    assert lowered.sum() > 0.3 * body.sum()
    # where it acts it lands near the truth, never on the backdrop's side of it
    assert np.abs(glass[lowered] / 255 - sc.alpha[lowered]).mean() < 0.1
    assert (glass <= edges).all()  # it only ever lowers alpha


def test_glass_with_the_models_own_mask(shared_engines):
    sc = gt.scene("glass", 20240601, (1224, 816))
    mask = shared_engines.mask("u2netp").predict(sc.rgb)
    assert _mae(refine(sc.rgb, mask, "glass"), sc.alpha) < \
        0.6 * _mae(refine(sc.rgb, mask, "edges"), sc.alpha)


@pytest.mark.parametrize("kind", ["shaded", "white-on-white", "product"])
@pytest.mark.parametrize("seed", [0, 3])
def test_opaque_subjects_are_left_exactly_alone(kind, seed):
    # shaded: an opaque grey cylinder lit by the sweep's own light, so its interior
    # follows the backdrop row by row; white-on-white: low contrast, faint texture
    sc = gt.scene(kind, seed, SIZE)
    mask = _opaque_mask(sc.alpha)
    assert see_through.see_through(sc.rgb, mask) is None
    assert np.array_equal(refine(sc.rgb, mask, "glass"), refine(sc.rgb, mask, "edges"))


@pytest.mark.parametrize("name", ["coffee", "astronaut", "chelsea"])
def test_real_photos_are_unchanged(shared_engines, name):
    rgb = photo(name)
    mask = shared_engines.mask("u2netp").predict(rgb)
    assert np.array_equal(refine(rgb, mask, "glass"), refine(rgb, mask, "edges"))


def test_deterministic_whatever_the_thread_count():
    sc = gt.scene("glass", 1, SIZE)
    mask = cv2.resize(_opaque_mask(sc.alpha), (600, 400), interpolation=cv2.INTER_AREA)
    first = refine(sc.rgb, mask, "glass")
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = refine(sc.rgb, mask, "glass")
    finally:
        cv2.setNumThreads(threads)
    assert (first < 200).sum() > 1000  # it did act
    assert first.tobytes() == refine(sc.rgb, mask, "glass").tobytes() == single.tobytes()


def test_nothing_to_see_through():
    rgb = np.full((300, 400, 3), 200, np.uint8)
    assert see_through.see_through(rgb, np.zeros((300, 400), np.uint8)) is None  # no subject
    assert see_through.see_through(rgb, np.full((300, 400), 255, np.uint8)) is None  # no backdrop
    tiny = np.full((8, 8), 255, np.uint8)
    assert see_through.see_through(np.zeros((8, 8, 3), np.uint8), tiny) is None
