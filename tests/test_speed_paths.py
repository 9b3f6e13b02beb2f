"""The fast paths of the new-file pipeline at camera sizes (issue 13) keep their results.

- a mask predicted from the reduced working copy agrees with the full-size input;
- the SciPy-free pHash is imagehash's, bit for bit;
- the straight-PNG path (alpha interleaved by the writer) is the same file as before;
- the RGBA colour transform is the RGB transform with the alpha carried over;
- an all-miss or all-hit `rembgd process` imports no rembg, pymatting, numba or scipy;
- the pixel budget serialises two large files and still runs one over the budget.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data as sd
from PIL import Image

from daemon.budget import PixelBudget
from daemon.config import OutputOptions
from daemon.config.schema import Deliverable
from daemon.imaging import deliver, fingerprint as fpm
from daemon.imaging.colour import to_srgb
from daemon.imaging.geometry import crop, crop_box, subject_box
from daemon.imaging.meta import SourceMeta
from daemon.imaging.refine import upscale
from daemon.imaging.render import predict_mask, working_mask_size

from tests.helpers import pipeline_over, write_config

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")
ADOBE = Path("/usr/share/color/icc/compatibleWithAdobeRGB1998.icc")


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(sd, name)()).resize(size, Image.Resampling.BICUBIC))


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("name", PHOTOS)
def test_mask_from_working_copy_matches_full_input(shared_engines, name):
    rgb = _photo(name, (3600, 2400))  # working copy: reduce(4) -> 900x600
    small = fpm.working_copy(Image.fromarray(rgb))
    assert small.size == (900, 600)
    opts = OutputOptions()
    engine = shared_engines.mask(opts.model)
    fast = predict_mask(engine, np.asarray(small), opts, (3600, 2400))
    full = predict_mask(engine, rgb, opts)  # the previous path: full image -> working size
    assert fast.shape == full.shape == working_mask_size(3600, 2400)[::-1]
    a, b = fast >= 128, full >= 128
    iou = (a & b).sum() / max(1, (a | b).sum())
    assert b.sum() > 0.02 * b.size  # a real subject, or the comparison means nothing
    assert iou >= 0.98, f"{name}: IoU {iou:.4f}"


@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket"])
def test_bilinear_full_size_mask_agrees_with_lanczos(shared_engines, name):
    """The 2048 px working mask expanded to 6000x4000: BILINEAR is LANCZOS within 3 levels."""
    rgb = _photo(name, (1500, 1000))  # the working copy of a 6000x4000 file
    mask = predict_mask(shared_engines.mask("u2netp"), rgb, OutputOptions(), (6000, 4000))
    assert mask.shape == (1365, 2048)
    fast = upscale(mask, 6000, 4000)
    ref = np.asarray(Image.fromarray(mask).resize((6000, 4000), Image.Resampling.LANCZOS))
    assert fast.shape == ref.shape == (4000, 6000)
    a, b = fast >= 128, ref >= 128
    assert 0.02 * b.size < b.sum() < 0.98 * b.size  # a real subject with an edge
    diff = np.abs(fast.astype(np.int16) - ref)
    assert (a & b).sum() / (a | b).sum() >= 0.999
    assert diff.mean() < 0.05 and diff.max() <= 4
    assert upscale(mask, 2048, 1365) is mask  # already full size: no copy


def test_phash_is_imagehash_bit_for_bit():
    import imagehash

    rng = np.random.default_rng(7)
    images = [Image.fromarray(getattr(sd, n)()) for n in PHOTOS + ("camera", "moon", "coins")]
    images += [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(20)]
    for img in images:
        ref = np.packbits(imagehash.phash(img, hash_size=16).hash.flatten()).tobytes()
        assert fpm.phash256(img) == ref


def test_pixel_hash_is_exact_and_copy_free():
    rgb = _photo("coffee", (600, 400))
    other = rgb.copy()
    other[399, 599, 2] ^= 1  # one bit of the last pixel
    assert fpm.pixel_hash(rgb) == fpm.pixel_hash(rgb.copy())
    assert fpm.pixel_hash(rgb) != fpm.pixel_hash(other)
    assert fpm.pixel_hash(rgb) != fpm.pixel_hash(rgb.reshape(200, 1200, 3))  # shape counts
    assert len(fpm.pixel_hash(rgb)) == 40


@pytest.mark.parametrize("spec", [
    Deliverable(name="plain"),
    Deliverable(name="srgb", colour="srgb", crop="subject", margin=4),
    Deliverable(name="strip", compression=6, metadata="strip"),
    Deliverable(name="stored", compression=0, max_size=5000),
    Deliverable(name="kept", hidden="keep"),
])
def test_straight_png_is_the_same_file(spec):
    rgb = np.ascontiguousarray(sd.astronaut())
    yy, xx = np.mgrid[:512, :512]
    mask = np.clip(300 - np.hypot(yy - 250, xx - 260), 0, 255).astype(np.uint8)
    meta = SourceMeta(icc=ADOBE.read_bytes() if ADOBE.is_file() else None, exif=None)
    fast = deliver.render(rgb, mask, spec, meta)
    full, m = rgb, mask
    if spec.crop == "subject":
        box = crop_box(subject_box(mask), spec.margin, spec.margin_unit, (512, 512))
        full, m = crop(rgb, box), crop(mask, box)
    assert (m == 0).any()
    assert fast == deliver.encode(deliver.cutout(full, m, clear=spec.hidden == "clear"), spec, meta)
    with Image.open(io.BytesIO(fast)) as img:
        assert img.mode == "RGBA" and np.array_equal(np.asarray(img)[..., 3], m)


@pytest.mark.skipif(not ADOBE.is_file(), reason="no Adobe RGB profile on this system")
def test_rgba_colour_transform_is_rgb_plus_alpha():
    rgb = np.ascontiguousarray(sd.chelsea())
    alpha = np.random.default_rng(3).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    icc = ADOBE.read_bytes()
    out_rgb, _ = to_srgb(rgb, icc)
    out_rgba, _ = to_srgb(np.dstack([rgb, alpha]), icc)
    assert not np.array_equal(out_rgb, rgb)  # the profile really converts
    assert np.array_equal(out_rgba[..., :3], out_rgb)
    assert np.array_equal(out_rgba[..., 3], alpha)


_PROBE = """
import sys
from daemon.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("rembg", "pymatting", "numba", "scipy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(rc)
"""


def _process_probe(cfg: Path, src: Path, out: Path) -> str:
    """`rembgd process` in a fresh interpreter; its summary, then HEAVY=<modules imported>."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, "--config", str(cfg), "process",
                           str(src), "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_all_miss_and_all_hit_process_import_no_inference_stack(tmp_path, models_dir):
    """u2netp runs on ONNX Runtime directly: neither misses nor hits import rembg."""
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(("coffee", "chelsea")):
        (src / f"{i}.jpg").write_bytes(_jpeg(_photo(name, (640, 480))))
    cfg = write_config(tmp_path, models_dir)
    first = _process_probe(cfg, src, tmp_path / "out1")
    assert "miss 2" in first and "HEAVY=" in first
    assert first.split("HEAVY=")[1].strip() == ""
    second = _process_probe(cfg, src, tmp_path / "out2")
    assert "exact 2" in second
    assert second.split("HEAVY=")[1].strip() == ""
    assert (tmp_path / "out2" / "0.jpg.png").read_bytes() == \
        (tmp_path / "out1" / "0.jpg.png").read_bytes()
    # the probe sees the imports when they do happen: post-processing is rembg's
    post = tmp_path / "post"
    post.mkdir()
    cfg = write_config(post, models_dir, output={"post_process_mask": True})
    third = _process_probe(cfg, src, post / "out")
    assert "miss 2" in third
    assert "rembg" in third.split("HEAVY=")[1]


def test_budget_serialises_two_large_files(tmp_path, models_dir, shared_engines):
    from daemon import config as configmod

    cfg = configmod.load(write_config(tmp_path, models_dir))
    pipeline = pipeline_over(cfg, shared_engines, None)
    size = (1200, 800)  # 0.96 MP each; budget 1.5 MP: one at a time
    pipeline.budget = PixelBudget(1_500_000)
    datas = [_jpeg(_photo(n, size)) for n in ("coffee", "rocket")]
    barrier, errors = threading.Barrier(2), []

    def work(data):
        try:
            barrier.wait()
            pipeline.render(data, _plan())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert pipeline.budget.peak == size[0] * size[1]  # never both at once
    assert pipeline.budget.in_flight == 0

    pipeline.budget = PixelBudget(500_000)  # smaller than one file: it still runs, alone
    out = pipeline.render(datas[0], _plan())
    assert out.files[""][:8] == b"\x89PNG\r\n\x1a\n"
    assert pipeline.budget.peak == size[0] * size[1]


def _plan():
    from daemon.pipeline import Plan

    return Plan(OutputOptions())
