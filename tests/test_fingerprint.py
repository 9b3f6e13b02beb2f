"""Unit tests of the pure functions in daemon/fingerprint.py (no models, no store)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import photo
from daemon import config as configmod
from daemon.imaging import fingerprint as fp
from daemon.imaging import match
from daemon.config import MatchThresholds

ROOT = Path(__file__).resolve().parents[1]
codes = st.binary(min_size=32, max_size=32)


def flip_bits(code: bytes, positions) -> bytes:
    bits = np.unpackbits(np.frombuffer(code, np.uint8))
    bits[list(positions)] ^= 1
    return np.packbits(bits).tobytes()


# ------------------------------------------------------------------ pHash bands


@settings(max_examples=300, deadline=None)
@given(codes, st.sets(st.integers(0, fp.PHASH_BITS - 1), max_size=15))
def test_codes_within_15_bits_share_a_band(code, positions):
    """The banded index's recall guarantee: Hamming distance <= 15 -> a shared band."""
    other = flip_bits(code, positions)
    assert fp.hamming(code, other) == len(positions)
    shared = [a == b for a, b in zip(fp.phash_bands(code), fp.phash_bands(other))]
    assert any(shared)


@given(codes)
def test_sixteen_bits_one_per_band_can_share_no_band(code):
    """...and the bound is tight: one flipped bit in each of the 16 bands shares none."""
    other = flip_bits(code, [band * fp.BAND_BITS for band in range(fp.BANDS)])
    assert fp.hamming(code, other) == 16
    assert all(a != b for a, b in zip(fp.phash_bands(code), fp.phash_bands(other)))


@given(codes)
def test_bands_are_16_values_of_16_bits(code):
    bands = fp.phash_bands(code)
    assert len(bands) == fp.BANDS == 16
    assert all(0 <= b < 1 << fp.BAND_BITS for b in bands)
    # the bands are the code itself, big-endian, so they can be re-assembled
    assert b"".join(b.to_bytes(2, "big") for b in bands) == code


# ------------------------------------------------------------------ hamming


@given(codes, codes)
def test_hamming_is_popcount_of_xor(a, b):
    expected = bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")
    assert fp.hamming(a, b) == expected == fp.hamming(b, a)
    assert fp.hamming(a, a) == 0


@given(codes, codes, codes)
def test_hamming_triangle_inequality(a, b, c):
    assert fp.hamming(a, c) <= fp.hamming(a, b) + fp.hamming(b, c)


# ------------------------------------------------------------------ aspect


def test_aspect_delta_zero_for_same_ratio_and_resizes():
    assert match.aspect_delta(640, 480, 640, 480) == 0.0
    assert match.aspect_delta(640, 480, 320, 240) == 0.0
    assert match.aspect_delta(4000, 3000, 1000, 750) == 0.0


@pytest.mark.parametrize("w, h, f", [(451, 300, 0.25), (451, 300, 0.5), (600, 400, 0.33),
                                     (641, 427, 0.1), (1999, 1333, 0.07)])
def test_aspect_delta_absorbs_rounding_of_resizes(w, h, f):
    """A resize rounds each side to whole pixels; that alone must never look like a crop."""
    rw, rh = max(1, round(w * f)), max(1, round(h * f))
    assert match.aspect_delta(w, h, rw, rh) == 0.0
    assert match.aspect_delta(rw, rh, w, h) == 0.0


def test_aspect_delta_sees_crops_and_rotations():
    assert match.aspect_delta(600, 400, 570, 400) > 0.04  # 5% off one side
    assert match.aspect_delta(600, 400, 400, 600) > 0.8  # rotated 90 degrees
    assert match.aspect_delta(600, 400, 570, 400) > MatchThresholds().max_aspect_delta


@given(st.integers(16, 5000), st.integers(16, 5000), st.integers(16, 5000), st.integers(16, 5000))
def test_aspect_delta_symmetric_and_non_negative(a, b, c, d):
    assert match.aspect_delta(a, b, c, d) == pytest.approx(match.aspect_delta(c, d, a, b))
    assert match.aspect_delta(a, b, c, d) >= 0.0


# ------------------------------------------------------------------ colour, thumbnails


def test_rgb_to_lab_matches_scikit_image():
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    # (the two use constants that differ in the 4th digit)
    assert np.allclose(fp.rgb_to_lab(rgb), rgb2lab(rgb), atol=0.01)


def test_thumbs_round_trip_and_layout():
    t = fp.thumbnails(Image.fromarray(photo("chelsea")))
    assert t.valid and t.luma.shape == (fp.LUMA_SIZE, fp.LUMA_SIZE)
    raw = t.to_bytes()
    assert len(raw) == fp.Thumbs.NBYTES
    back = fp.Thumbs.from_bytes(raw)
    assert np.array_equal(back.luma, t.luma) and np.array_equal(back.ab, t.ab)


def test_thumbs_of_another_layout_never_verify():
    """A row written by an older version (64x64 luma) must be a miss, never an error."""
    old = fp.Thumbs.from_bytes(bytes(64 * 64 + 32 * 32 * 2))
    assert not old.valid
    a = fingerprint_of(photo("coffee"))
    stale = dataclasses.replace(a, thumbs=old, sha256="other", pixel_hash="other")
    v = match.verify(a, stale, MatchThresholds())
    assert not v.accepted and v.reason == "missing"


def test_compare_size_needs_three_pixels_per_thumbnail_pixel():
    assert match.compare_size(4000, 3000, 1000, 750) == 128
    assert match.compare_size(451, 300, 451, 300) == 64  # 300 < 3 * 128
    assert match.compare_size(451, 300, 113, 75) == 16
    assert match.compare_size(20, 20, 20, 20) == 16  # never below 16


def test_working_copy_keeps_small_images_and_reduces_large_ones():
    small = Image.new("RGB", (1000, 700))
    assert fp.working_copy(small) is small
    big = fp.working_copy(Image.new("RGB", (4000, 3000)))
    assert 512 <= min(big.size) < 1024


# ------------------------------------------------------------------ metrics


def test_tone_residual_absorbs_a_quadratic_tone_curve():
    c = np.random.default_rng(1).uniform(0, 100, (32, 32))
    q = 3 + 0.9 * c + 0.001 * c * c
    assert np.abs(match.tone_residual(q, c)).max() < 1e-6
    q2 = q.copy()
    q2[:4, :4] += 20  # a local edit survives the fit
    assert np.abs(match.tone_residual(q2, c)).max() > 15


def test_edge_correlation_identity_shift_and_flat():
    luma = fp.thumbnails(Image.fromarray(photo("astronaut"))).luma.astype(float)
    assert match.edge_correlation(luma, luma) == pytest.approx(1.0)
    assert match.edge_correlation(luma, luma * 0.8 + 10) == pytest.approx(1.0)
    assert match.edge_correlation(luma, np.roll(luma, 2, axis=1)) < 0.9
    assert match.edge_correlation(luma, luma[:, ::-1]) < 0.5
    flat = np.full((64, 64), 50.0)
    assert match.edge_correlation(flat, flat) == 1.0
    assert match.edge_correlation(flat, flat + 20) == 0.0
    assert match.edge_correlation(flat, luma[:64, :64]) == 0.0


def fingerprint_of(rgb: np.ndarray, embedding: np.ndarray | None = None) -> fp.Fingerprint:
    if embedding is None:  # a stand-in: verify() needs one, these tests do not test it
        embedding = np.ones(fp.EMBED_DIM, np.float32) / np.sqrt(fp.EMBED_DIM)
    return fp.fingerprint(rgb.tobytes(), rgb, embedding)


def test_verify_accepts_itself_and_reports_every_metric():
    a = fingerprint_of(photo("astronaut"))
    v = match.verify(a, a, MatchThresholds())
    assert v.accepted and v.reason == "verified"
    assert {m for m, _, _ in match.CHECKS} <= set(v.metrics)
    assert v.metrics["edge_corr"] == pytest.approx(1.0)
    assert v.metrics["luma_max"] < 1e-6 and v.metrics["colour_max"] == 0.0


def test_verify_without_embedding_is_a_miss():
    a = fingerprint_of(photo("astronaut"))
    b = dataclasses.replace(a, embedding=None)
    v = match.verify(a, b, MatchThresholds())
    assert not v.accepted and v.reason == "missing"


def test_verify_reasons_follow_check_order():
    rgb = photo("coffee")
    a = fingerprint_of(rgb)
    recoloured = fingerprint_of(np.ascontiguousarray(rgb[..., ::-1]))  # RGB -> BGR
    v = match.verify(recoloured, a, MatchThresholds())
    assert not v.accepted and v.reason in ("phash", "luma", "colour")
    v = match.verify(fingerprint_of(np.ascontiguousarray(rgb[:, ::-1])), a, MatchThresholds())
    assert not v.accepted and v.reason in ("phash", "structure")
    wide = fingerprint_of(np.ascontiguousarray(rgb[:, 30:]))
    assert match.verify(wide, a, MatchThresholds()).reason == "aspect"


def test_decide_applies_each_threshold():
    t = MatchThresholds()
    ok = {"aspect_delta": 0.0, "phash": 0, "cosine": 1.0, "edge_corr": 1.0, "luma_max": 0.0,
          "colour_max": 0.0}
    assert match.decide(ok, t).accepted
    for metric, field_name, kind in match.CHECKS:
        limit = getattr(t, field_name)
        at = {**ok, metric: limit}
        assert match.decide(at, t).accepted, f"{metric} at its threshold passes"
        beyond = limit + (1 if kind == "max" else -0.01)
        v = match.decide({**ok, metric: beyond}, t)
        assert not v.accepted and v.reason == match.REASONS[metric]
        assert match.decide({**ok, metric: None}, t).reason == "missing"


# ------------------------------------------------------------------ defaults


def test_config_yaml_match_section_equals_the_calibrated_defaults():
    cfg = configmod.load(ROOT / "config.yaml", check_folders=False)
    assert cfg.cache.match == MatchThresholds()


def test_calibration_report_documents_the_current_defaults():
    """bench/calibration.md must be regenerated whenever a default changes."""
    text = (ROOT / "bench" / "calibration.md").read_text()
    for f in dataclasses.fields(MatchThresholds):
        value = getattr(MatchThresholds(), f.name)
        shown = str(value) if isinstance(value, int) else f"{value:.3f}"
        assert f"`{f.name}: {shown}`" in text, f"{f.name} = {value} not in calibration.md"
    assert re.search(r"false hits: 0 of \d+ negatives", text)


def test_match_keys_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  match:\n    min_edge_corr: 0.97\n    max_colour_delta: 7\n")
    m = configmod.load(path, check_folders=False).cache.match
    assert m.min_edge_corr == 0.97 and m.max_colour_delta == 7.0
    path.write_text("cache:\n  match:\n    max_hue_tv: 0.1\n")
    with pytest.raises(configmod.ConfigError, match="max_hue_tv"):
        configmod.load(path, check_folders=False)
    path.write_text("cache:\n  match:\n    phash_radius: 16\n")
    with pytest.raises(configmod.ConfigError, match="phash_radius"):
        configmod.load(path, check_folders=False)
