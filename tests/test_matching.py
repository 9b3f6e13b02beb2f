"""Cache matching through the real Pipeline: real photos, real models, a real SqliteStore.

"A false hit is worse than a miss": near-duplicates reuse the cached mask only when
``fingerprint.verify`` accepts them, and the hard negatives of bench/calibrate.py never do.
The image edits are the calibration's own (bench/calibrate.py), on fewer photos.
"""
from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (encode, photo, pipeline_over, png_alpha, render_legacy, unstamped,
                      write_config)
from daemon import config as configmod
from daemon.imaging import despill
from daemon.imaging import fingerprint as fpmod
from daemon.config import AlphaMatting
from daemon.imaging.stamp import read_stamp
from daemon.imaging.decode import decode
from daemon.imaging.refine import refine
from daemon.config import Config
from daemon.pipeline import Pipeline, Plan
from daemon.cache.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import calibrate as cal  # noqa: E402  (the labelled transforms of the calibration)

HIT = ("exact", "pixel", "near")


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass
class Cached:
    """A real Pipeline over its own SQLite cache, with the config it was built from."""

    pipeline: Pipeline
    cfg: Config
    store: SqliteStore

    def render_bytes(self, data: bytes, options):
        return render_legacy(self.pipeline, data, options)

    def mask_key(self, options) -> str:
        return self.pipeline.mask_key(options)

    def output_key(self, options) -> str:
        return self.pipeline.targets(Plan(options))[0].output_key


def png(rendered) -> bytes:
    return rendered.files[""]


@pytest.fixture
def make_pipeline(tmp_path, models_dir, shared_engines):
    """``make_pipeline(name="p", **config overrides)`` -> a Cached pipeline over its own cache."""
    stores: list[SqliteStore] = []

    def make(name: str = "p", **overrides) -> Cached:
        base = tmp_path / name
        base.mkdir()
        cfg = configmod.load(write_config(base, models_dir, **overrides))
        store = SqliteStore(cfg.cache.dir)
        stores.append(store)
        return Cached(pipeline_over(cfg, shared_engines, store), cfg, store)

    yield make
    for s in stores:
        s.close()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a >= 128, b >= 128
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def small(rgb: np.ndarray, side: int = 360) -> np.ndarray:
    """Keep the test quick: inference cost grows with the image size."""
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    return cal.resize(rgb, f) if f < 1 else rgb


# Photos with a clear subject: on subject-less ones (textures, the moon, a star field)
# u2netp's own mask changes a lot under a mere re-encode, so fresh inference is no
# reference for the reused mask (see the IoU table in bench/calibration.md).
PHOTOS = {
    "astronaut": lambda: photo("astronaut"),
    "coffee": lambda: photo("coffee"),
    "motorcycle": lambda: cal.stereo()[0],
    "studio": lambda: cal.studio_shot(seed=7, product=7),
}


# ------------------------------------------------------------------ exact / pixel


def test_exact_and_same_pixel_repeats_are_identical_to_the_first_result(make_pipeline, inferences):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    rgb = small(photo("chelsea"))
    original = cal.exif_bytes(rgb, "shoot 1")  # a JPEG with EXIF
    first = p.render_bytes(original, opts)
    assert first.tier == "miss" and len(inferences) == 1

    pixels = decode(original).rgb
    same_pixels = {
        "png": encode(pixels, "PNG"),
        "png level 9": encode(pixels, "PNG", compress_level=9),
        "lossless webp": encode(pixels, "WEBP", lossless=True),
        "exif-only change": cal.exif_bytes(rgb, "shoot 1, edited caption"),
    }
    assert decode(same_pixels["exif-only change"]).rgb.tobytes() == pixels.tobytes()
    outputs = {"same bytes": png(first)}
    for name, data in same_pixels.items():
        r = p.render_bytes(data, opts)
        assert r.tier == "pixel", name
        # the same pixels and alpha; the bytes differ by each source's own metadata
        assert rgba(png(r)).tobytes() == rgba(png(first)).tobytes(), name
        outputs[name] = png(r)

    for name, data in {"same bytes": original, **same_pixels}.items():
        r = p.render_bytes(data, opts)  # a pixel hit left an alias row: now exact
        assert r.tier == "exact", name
        assert png(r) == outputs[name], name
    assert len(inferences) == 1


def rgba(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGBA"))


# ------------------------------------------------------------------ positives


POSITIVES = {
    "jpeg q50": lambda rgb: encode(rgb, "JPEG", quality=50),
    "jpeg q95": lambda rgb: encode(rgb, "JPEG", quality=95),
    "webp q80": lambda rgb: encode(rgb, "WEBP", quality=80),
    "resize 50%": lambda rgb: cal.encode(cal.resize(rgb, 0.5)),
    "resize 150%": lambda rgb: cal.encode(cal.resize(rgb, 1.5)),
    "gamma 1.05": lambda rgb: cal.encode(cal.gamma(rgb, 1.05)),
    "brightness -5%": lambda rgb: cal.encode(cal.brightness(rgb, 0.95)),
}


def test_near_duplicates_reuse_the_mask_on_their_own_pixels(make_pipeline, inferences,
                                                            shared_engines):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    engine = shared_engines.mask("u2netp")
    results: dict[tuple[str, str], str] = {}
    for name, make in PHOTOS.items():
        rgb = make()  # full size: at 360 px u2netp's own masks of a re-encode differ more
        assert p.render_bytes(cal.encode(rgb), opts).tier == "miss"
        for transform, edit in POSITIVES.items():
            data = edit(rgb)
            before = len(inferences)
            r = p.render_bytes(data, opts)
            results[(name, transform)] = r.tier
            if r.tier != "near":
                continue
            assert len(inferences) == before, "a near hit must not run inference"
            assert r.metrics and r.metrics["edge_corr"] >= p.cfg.cache.match.min_edge_corr
            q = decode(data).rgb
            with Image.open(io.BytesIO(png(r))) as img:
                out = np.asarray(img.convert("RGBA"))
            assert out.shape[:2] == q.shape[:2]  # the mask was resized to the new size
            # the cached mask is applied to the NEW pixels, not a copy of the old output
            # (unassociated alpha: the colour of every shown pixel is the source's own, but
            # in partial ones, where despill writes the subject's colour; black under alpha 0)
            a = out[..., 3]
            whole = a > despill.HIGH
            assert whole.sum() > 5000 and np.array_equal(out[..., :3][whole], q[whole]), \
                (name, transform)
            assert not out[..., :3][a == 0].any(), (name, transform)
            fresh = refine(q, engine.predict(q))  # what a miss renders (refine: edges)
            score = iou(out[..., 3], fresh)
            assert score >= 0.95, f"{name} {transform}: reused mask IoU {score:.3f}"
    near = [k for k, tier in results.items() if tier == "near"]
    missed = {k: t for k, t in results.items() if t != "near"}
    assert len(near) >= 0.9 * len(results), f"near hits {len(near)}/{len(results)}: {missed}"


# ------------------------------------------------------------------ hard negatives


def hard_negatives(rgb: np.ndarray, alpha: np.ndarray) -> dict[str, bytes]:
    out = {f"hue {d} whole": cal.encode(cal.hue_shift(rgb, d)) for d in (60, 120, 180)}
    for d in (60, 180):
        out[f"hue {d} object"] = cal.encode(cal.blend(cal.hue_shift(rgb, d), rgb, alpha))
    out["object 30% darker"] = cal.encode(cal.blend(cal.brightness(rgb, 0.7), rgb, alpha))
    out["crop 5% centre, resized back"] = cal.encode(cal.crop(rgb, 0.05, "centre", True))
    out["crop 10% centre"] = cal.encode(cal.crop(rgb, 0.10, "centre", False))
    out["crop 5% one side"] = cal.encode(cal.crop(rgb, 0.05, "side", False))
    out["flip horizontal"] = cal.encode(np.ascontiguousarray(rgb[:, ::-1]))
    out["rotate 3"] = cal.encode(cal.rotate(rgb, 3))
    out["rotate 15"] = cal.encode(cal.rotate(rgb, 15))
    return out


def assert_all_misses(p: Cached, original: bytes, negatives: dict[str, bytes]) -> int:
    """Each negative against a cache holding only ``original``; returns how many of them
    were within the pHash radius, i.e. reached ``fingerprint.verify``."""
    opts = p.cfg.output_defaults
    key = p.mask_key(opts)
    assert p.render_bytes(original, opts).tier == "miss"
    verified = 0
    for name, data in negatives.items():
        fq = fpmod.fingerprint(data, decode(data).rgb)
        verified += bool(p.store.find_near(key, fq.phash, p.cfg.cache.match.phash_radius))
        r = p.render_bytes(data, opts)
        assert r.tier == "miss", f"false hit: {name} ({r.tier}, {r.metrics})"
        p.store.delete([r.entry_id])  # the next negative meets the original alone again
    return verified


def test_hard_negatives_are_never_hits(make_pipeline, shared_engines):
    engine = shared_engines.mask("u2netp")
    verified = 0
    photos = {"rocket": photo("rocket"), "immunohistochemistry": photo("immunohistochemistry"),
              "studio": cal.studio_shot(seed=1, product=1)}
    for name, rgb in photos.items():
        rgb = small(rgb)
        negatives = hard_negatives(rgb, engine.predict(rgb))
        verified += assert_all_misses(make_pipeline(name), cal.encode(rgb), negatives)
    # a hard set: the recolours keep pHash within the radius, so verify() alone rejects them
    assert verified >= 10, f"only {verified} negatives reached verify()"


def test_other_shots_and_other_photos_of_the_same_kind_are_misses(make_pipeline):
    left, right = cal.stereo()
    assert_all_misses(make_pipeline("stereo"), cal.encode(small(left)),
                      {"stereo right": cal.encode(small(right))})
    series = {f"moved {dx:.0%}": cal.encode(cal.studio_shot(3, 13, dx=dx)) for dx in (0.01, 0.02)}
    series["scaled -3%"] = cal.encode(cal.studio_shot(3, 13, scale=0.97))
    series["scaled +5%"] = cal.encode(cal.studio_shot(3, 13, scale=1.05))
    series["another product"] = cal.encode(cal.studio_shot(3, 14))
    assert_all_misses(make_pipeline("series"), cal.encode(cal.studio_shot(3, 13)), series)
    assert_all_misses(make_pipeline("texture"), cal.encode(photo("brick")),
                      {"gravel": cal.encode(photo("gravel")), "grass": cal.encode(photo("grass"))})


# ------------------------------------------------------------------ cache key


def test_mask_options_are_a_miss_render_options_reuse_the_mask(make_pipeline, inferences):
    """The mask is keyed by the model and post-processing only; every other option keys
    only the stored output, so changing it re-renders from the cached mask."""
    p = make_pipeline()
    base = p.cfg.output_defaults
    rgb = small(photo("chelsea"), 200)
    data = encode(rgb, "JPEG", quality=90)
    first = p.render_bytes(data, base)
    assert first.tier == "miss" and len(inferences) == 1
    post = dataclasses.replace(base, post_process_mask=True)
    r = p.render_bytes(data, post)
    assert r.tier == "miss" and len(inferences) == 2, "post-processing changes the mask"
    am = AlphaMatting(enabled=True)
    variants = {
        "only_mask": dataclasses.replace(base, only_mask=True),
        "bgcolor": dataclasses.replace(base, bgcolor=(255, 255, 255, 255)),
        "other bgcolor": dataclasses.replace(base, bgcolor=(0, 0, 0, 255)),
        "png_compression": dataclasses.replace(base, png_compression=6),
        "alpha_matting": dataclasses.replace(base, alpha_matting=am),
        "erode_size": dataclasses.replace(
            base, alpha_matting=dataclasses.replace(am, erode_size=4)),
        "srgb": dataclasses.replace(base, colour="srgb"),
    }
    outputs = {"default": png(first), "post_process_mask": png(r)}
    for name, opts in variants.items():
        r = p.render_bytes(data, opts)
        assert r.tier == "exact" and not r.inferred, name  # the mask, found by these bytes
        assert png(r) not in outputs.values() or name == "srgb", name
        outputs[name] = png(r)
    assert len(inferences) == 2
    for name, opts in {"default": base, "post_process_mask": post, **variants}.items():
        r = p.render_bytes(data, opts)  # each output stored under its own key
        assert r.tier == "exact" and png(r) == outputs[name], name
    assert len(inferences) == 2


def test_near_duplicate_under_other_mask_options_is_a_miss(make_pipeline):
    p = make_pipeline()
    base = p.cfg.output_defaults
    rgb = small(photo("coffee"), 240)
    assert p.render_bytes(cal.encode(rgb), base).tier == "miss"
    other = dataclasses.replace(base, post_process_mask=True)
    assert p.render_bytes(encode(rgb, "JPEG", quality=90), other).tier == "miss"
    assert p.render_bytes(encode(rgb, "JPEG", quality=80), base).tier == "near"
    white = dataclasses.replace(base, bgcolor=(255, 255, 255, 255))  # a render option only
    assert p.render_bytes(encode(rgb, "JPEG", quality=70), white).tier == "near"


# ------------------------------------------------------------------ single flight


def concurrently(fn, items):
    barrier = threading.Barrier(len(items))
    results: list = [None] * len(items)
    errors: list = []

    def run(i, item):
        try:
            barrier.wait()
            results[i] = fn(item)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, it)) for i, it in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_single_flight_five_copies_infer_once(make_pipeline, inferences):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    data = encode(small(photo("astronaut")), "JPEG", quality=90)
    results = concurrently(lambda d: p.render_bytes(d, opts), [data] * 5)
    assert len(inferences) == 1
    assert len({png(r) for r in results}) == 1
    assert sorted(r.tier for r in results).count("miss") == 1


def test_single_flight_covers_other_encodings_of_the_same_pixels(make_pipeline, inferences):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    rgb = small(photo("coffee"))
    files = [encode(rgb, "PNG"), encode(rgb, "PNG", compress_level=9),
             encode(rgb, "WEBP", lossless=True), encode(rgb, "TIFF"), encode(rgb, "BMP")]
    results = concurrently(lambda d: p.render_bytes(d, opts), files)
    assert len(inferences) == 1
    assert len({unstamped(png(r)) for r in results}) == 1
    assert all(read_stamp(io.BytesIO(png(r))) == r.sha256 for r in results)


# ------------------------------------------------------------------ crash safety


def blob_path(p: Cached, digest: str) -> Path:
    return p.store.blobs.path(digest)


def mask_entry(p: Cached):
    (entry,) = [e for e in p.store.entries() if e.key == p.mask_key(p.cfg.output_defaults)]
    return entry


def test_corrupt_output_blob_is_rendered_again_from_the_mask(make_pipeline, inferences):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    data = encode(small(photo("rocket")), "JPEG", quality=90)
    first = p.render_bytes(data, opts)
    entry = p.store.find_exact(p.output_key(opts), first_sha(data))
    path = blob_path(p, entry.output_digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: still a plausible PNG, wrong content
    path.write_bytes(bytes(raw))

    again = p.render_bytes(data, opts)
    assert again.tier == "exact" and png(again) == png(first)
    assert len(inferences) == 1  # the cached mask served it
    repaired = p.store.find_exact(p.output_key(opts), first_sha(data))
    assert repaired.id != entry.id
    assert p.store.get_blob(repaired.output_digest) == unstamped(png(first))
    assert p.render_bytes(data, opts).tier == "exact"


def test_corrupt_mask_blob_is_a_miss_and_the_rows_are_repaired(make_pipeline, inferences):
    p = make_pipeline(cache={"store_outputs": False})
    opts = p.cfg.output_defaults
    data = encode(small(photo("rocket")), "JPEG", quality=90)
    first = p.render_bytes(data, opts)
    entry = mask_entry(p)
    path = blob_path(p, entry.mask_digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = p.render_bytes(data, opts)
    assert again.tier == "miss" and png(again) == png(first) and len(inferences) == 2
    assert p.store.count() == 1 and mask_entry(p).id != entry.id  # the bad row went


def test_corrupt_mask_blob_of_a_near_candidate_is_a_miss(make_pipeline, inferences,
                                                        shared_engines):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    rgb = small(photo("astronaut"))
    p.render_bytes(cal.encode(rgb), opts)
    entry = mask_entry(p)
    blob_path(p, entry.mask_digest).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    near = encode(rgb, "JPEG", quality=90)
    r = p.render_bytes(near, opts)
    assert r.tier == "miss" and len(inferences) == 2
    q = decode(near).rgb
    assert iou(png_alpha(png(r)), refine(q, shared_engines.mask("u2netp").predict(q))) > 0.99
    assert entry.id not in {e.id for e in p.store.entries()}


@pytest.mark.parametrize("which", ["output", "mask", "both"])
def test_deleted_blob_file_is_a_miss_never_an_error(make_pipeline, inferences, which):
    p = make_pipeline()
    opts = p.cfg.output_defaults
    data = encode(small(photo("coffee"), 240), "JPEG", quality=90)
    first = p.render_bytes(data, opts)
    entry = mask_entry(p)
    output = p.store.find_exact(p.output_key(opts), first_sha(data))
    digests = {"output": [output.output_digest], "mask": [entry.mask_digest],
               "both": [output.output_digest, entry.mask_digest]}[which]
    for d in digests:
        blob_path(p, d).unlink()
    r = p.render_bytes(data, opts)
    assert png(r) == png(first)
    if which == "mask":  # the output blob still serves exact repeats...
        assert r.tier == "exact"
        near = p.render_bytes(encode(decode(data).rgb, "JPEG", quality=80), opts)
        assert near.tier == "miss"  # ...but the mask is gone: no reuse, no error
        assert entry.id not in {e.id for e in p.store.entries()}  # and the row went
    elif which == "output":  # rendered again from the cached mask, no inference
        assert r.tier == "exact" and len(inferences) == 1
    else:
        assert r.tier == "miss"
        assert p.render_bytes(data, opts).tier == "exact"


def first_sha(data: bytes) -> str:
    return fpmod.sha256_bytes(data)


# ------------------------------------------------------------------ CLI


def test_process_prints_correct_tier_counts(tmp_path, models_dir):
    cfg = write_config(tmp_path, models_dir)
    folder = tmp_path / "shoot"
    folder.mkdir()
    rgb = small(photo("chelsea"))
    original = encode(rgb, "PNG")
    (folder / "a_original.png").write_bytes(original)
    (folder / "b_copy.png").write_bytes(original)
    (folder / "c_resaved.png").write_bytes(encode(rgb, "PNG", compress_level=9))
    (folder / "d_reencoded.jpg").write_bytes(encode(rgb, "JPEG", quality=90))
    (folder / "e_other.png").write_bytes(encode(small(photo("coffee")), "PNG"))
    (folder / "f_broken.jpg").write_bytes(encode(rgb, "JPEG")[:300])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "process",
                           str(folder), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "6 files: exact 1, pixel 1, near 1, miss 2, failed 1" in proc.stdout, \
        proc.stdout + proc.stderr
    assert proc.returncode == 1  # a failed file makes the run fail
    assert "f_broken.jpg" in proc.stderr
    made = sorted(f.name for f in out.iterdir())
    assert len(made) == 5 and not any(n.startswith("f_broken") for n in made)
    outputs = {n: (out / n).read_bytes() for n in made}
    copies = [v for n, v in outputs.items() if n.startswith(("a_", "b_", "c_"))]
    assert len({unstamped(c) for c in copies}) == 1  # hits: identical but for the stamp

    again = subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "process",
                            str(folder), "-o", str(tmp_path / "out2")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "6 files: exact 5, pixel 0, near 0, miss 0, failed 1" in again.stdout, \
        again.stdout + again.stderr
