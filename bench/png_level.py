"""PNG zlib level vs encode time and size, on real RGBA cutouts at 1, 6 and 24 MP.

    .venv/bin/python bench/png_level.py            # writes bench/png_level.md

The cutouts are built the way the daemon builds them: a scikit-image photo,
its real u2netp mask (predicted at the photo's own size), both upscaled to the
target size (LANCZOS), then rembg's naive cutout (``daemon.render.render``).
Upscaled photos are smoother than real camera files of the same size, so a
second variant adds mild Gaussian grain (sigma 3) as a stand-in for sensor noise.

Encoding is single-threaded zlib inside Pillow, so the CPU time of the process
(``time.process_time``) is the cost; it is also robust to other load on the
machine. Wall time is reported beside it.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.config import OutputOptions  # noqa: E402
from daemon.inference.engine import Engines  # noqa: E402
from daemon.imaging.render import render  # noqa: E402

LEVELS = (0, 1, 3, 6, 9)
SIZES = {"1 MP": (1224, 816), "6 MP": (3000, 2000), "24 MP": (6000, 4000)}  # 3:2 camera frames
PHOTO = "coffee"  # 400x600, 3:2: a product on a table, a typical studio subject


def cutout(models_dir: Path, size: tuple[int, int], grain: float) -> Image.Image:
    import skimage.data

    rgb = getattr(skimage.data, PHOTO)()[..., :3]
    mask = Engines(models_dir, threads=0).mask("u2netp").predict(rgb)
    big = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)
    big_mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.LANCZOS))
    arr = np.asarray(big)
    if grain:
        rng = np.random.default_rng(0)
        arr = np.clip(arr + rng.normal(0, grain, arr.shape), 0, 255).astype(np.uint8)
    return render(np.ascontiguousarray(arr), np.ascontiguousarray(big_mask), OutputOptions())


def measure(img: Image.Image, level: int, repeats: int) -> tuple[float, float, int]:
    best_cpu = best_wall = float("inf")
    size = 0
    for _ in range(repeats):
        buf = io.BytesIO()
        c0, w0 = time.process_time(), time.perf_counter()
        img.save(buf, "PNG", compress_level=level)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
        size = buf.tell()
    return best_cpu, best_wall, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    args = ap.parse_args()

    rows = []
    for label in args.sizes:
        w, h = SIZES[label]
        for variant, grain in (("smooth", 0.0), ("grain", 3.0)):
            img = cutout(args.models_dir, (w, h), grain)
            raw = w * h * 4
            repeats = 3 if w * h <= 2_000_000 else (2 if w * h <= 8_000_000 else 1)
            for level in LEVELS:
                cpu, wall, size = measure(img, level, repeats)
                rows.append((label, variant, level, cpu, wall, size, raw))
                print(f"{label:>5} {variant:6} level {level}: cpu {cpu:6.2f} s  wall {wall:6.2f} s"
                      f"  {size / 1e6:7.2f} MB ({size / raw:5.1%} of raw)", flush=True)
    previous = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(report(rows, previous))
    print(f"wrote {args.out}")


def report(rows, previous: str = "") -> str:
    """The table; the hand-written recommendation of an earlier report is kept."""
    by = {(r[0], r[1], r[2]): r for r in rows}
    lines = [
        "# PNG compression level: encode time and size",
        "",
        f"`bench/png_level.py`, Pillow {Image.__version__}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. RGBA cutouts of skimage `{PHOTO}` with its real u2netp mask, "
        "upscaled (LANCZOS) to each size; *grain* adds Gaussian noise (sigma 3) to stand in for "
        "the sensor noise of a real camera file. Time is the best CPU time of the encode "
        "(zlib in Pillow is single-threaded), wall time in brackets; size relative to level 6, "
        "rembg's default.",
        "",
        "| size | content | level | encode CPU s (wall) | file MB | vs level 6 size | "
        "vs level 6 time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (label, variant, level), (_, _, _, cpu, wall, size, raw) in by.items():
        ref = by.get((label, variant, 6))
        rel_size = f"{size / ref[5]:.2f}x" if ref else ""
        rel_time = f"{cpu / ref[3]:.2f}x" if ref and ref[3] > 0 else ""
        lines.append(f"| {label} | {variant} | {level} | {cpu:.2f} ({wall:.2f}) | "
                     f"{size / 1e6:.2f} | {rel_size} | {rel_time} |")
    marker = "## Recommendation"
    kept = previous.split(marker, 1)[1].strip() if marker in previous else \
        "(to be written after reading the table above)"
    lines += ["", marker, "", kept, ""]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
