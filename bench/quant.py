"""int8 against fp32: the quality gate and per-image inference time, interleaved in one process.

    .venv/bin/python bench/quant.py [--models-dir var/models] [--threads 2] [--rounds 5]

For each installed pair (u2netp / u2netp-int8, u2net / u2net-int8): the gate
(mask IoU against the fp32 model on the real photos, ``daemon/inference/quantize.py``)
and ``predict`` time at the 320 px model input, fp32 and int8 taking turns on the
same photo so that other load on a shared machine hits both alike. Reports median
seconds per image and the ratios, including u2net-int8 against u2netp fp32 (the
default's criterion: at most 1.4x). Writes bench/quant.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.inference import quantize  # noqa: E402
from daemon.inference.engine import Engines  # noqa: E402
from daemon.inference.models import mask_model_path  # noqa: E402

PAIRS = (("u2netp", "u2netp-int8"), ("u2net", "u2net-int8"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "quant.md")
    args = ap.parse_args()
    engines = Engines(args.models_dir, threads=args.threads)
    names = [n for pair in PAIRS for n in pair if mask_model_path(args.models_dir, n).is_file()]
    photos = [quantize.photo(p) for p in quantize.SUBJECT_PHOTOS]
    for n in names:  # load + warm up
        engines.mask(n).predict(photos[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for rgb in photos:
            for n in names:  # interleaved: every model on the same photo in turn
                t = time.perf_counter()
                engines.mask(n).predict(rgb)
                times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    lines = ["# int8 against fp32 (bench/quant.py)", "",
             f"`bench/quant.py --threads {args.threads} --rounds {args.rounds}` on "
             f"{platform.processor() or platform.machine()}, {len(photos)} photos x "
             f"{args.rounds} rounds, models interleaved per photo; median s per image "
             "(predict: resize to 320, model, mask back to the photo's size).", "",
             "| model | s / image | gate: mean IoU | min IoU (photo) | passed |",
             "|---|---:|---:|---:|---|"]
    for fp32, int8 in PAIRS:
        if fp32 in med:
            lines.append(f"| {fp32} | {med[fp32]:.3f} | | | |")
        if int8 in med:
            g = quantize.gate(engines.mask(fp32), engines.mask(int8))
            lines.append(f"| {int8} | {med[int8]:.3f} | {g.mean_iou:.4f} | {g.min_iou:.4f} "
                         f"({g.worst}) | {g.passed} |")
            lines.append("")
            lines.append(f"{int8} photos without a subject (not gated): " + ", ".join(
                f"{k} {v:.3f}" for k, v in g.unscored.items()))
            lines.append("")
    lines += ["", "Ratios (same run):", ""]
    for fp32, int8 in PAIRS:
        if fp32 in med and int8 in med:
            lines.append(f"- {int8} is {med[fp32] / med[int8]:.2f}x faster than {fp32}")
    if "u2net-int8" in med and "u2netp" in med:
        lines.append(f"- u2net-int8 costs {med['u2net-int8'] / med['u2netp']:.2f}x u2netp fp32 "
                     "per image (default criterion: <= 1.4x)")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
