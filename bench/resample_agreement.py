"""Cheaper resamplers around U^2-Net against rembg's LANCZOS both ways: do the masks hold?

    .venv/bin/python bench/resample_agreement.py [--model u2netp] [--composites 6]

rembg resizes the photo to the model's 320x320 input with LANCZOS and the mask back to
the photo's size with LANCZOS (``daemon.inference.engine.U2netSession`` does the same,
byte for byte). Each variant swaps one or both resamplers and is scored against rembg's
own mask on the real scikit-image photos available offline (tests/helpers.photo) and on
studio composites (bench/workloads.composite, seeds 7000-): mask IoU (>= 128) and
boundary F within 3 px (bench/quality.py). The bar for a swap: IoU >= 0.99 on the photos.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import boundary_f  # noqa: E402
from tests.helpers import photo  # noqa: E402
import workloads as wl  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "horse", "coins",
          "immunohistochemistry", "retina", "hubble_deep_field", "colorwheel")  # offline ones
R = Image.Resampling
VARIANTS = {  # name: (photo -> input, reducing_gap, mask -> photo)
    "box in, bilinear out": (R.BOX, None, R.BILINEAR),
    "box in, LANCZOS out": (R.BOX, None, R.LANCZOS),
    "LANCZOS reducing_gap=2 in, bilinear out": (R.LANCZOS, 2.0, R.BILINEAR),
    "LANCZOS in, bilinear out": (R.LANCZOS, None, R.BILINEAR),
}


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    a, b = ours >= 128, theirs >= 128
    union = np.logical_or(a, b).sum()
    return (float(np.logical_and(a, b).sum() / union) if union else 1.0), boundary_f(a, b)


def variant_mask(session, img: Image.Image, into, gap, back) -> np.ndarray:
    """``U2netSession.predict`` with the resamplers swapped (the same arithmetic otherwise)."""
    mean, std = session.spec.norm
    size = session.spec.input_size
    ary = np.array(img.resize((size, size), into, reducing_gap=gap))
    ary = ary / max(np.max(ary), 1e-6)
    tmp = np.zeros((size, size, 3))
    for c in range(3):
        tmp[:, :, c] = (ary[:, :, c] - mean[c]) / std[c]
    feed = np.expand_dims(tmp.transpose((2, 0, 1)), 0).astype(np.float32)
    pred = session.inner_session.run(None, {session._input: feed})[0][:, 0, :, :]
    ma, mi = np.max(pred), np.min(pred)
    pred = np.squeeze((pred - mi) / (ma - mi))
    mask = Image.fromarray((pred.clip(0, 1) * 255).astype("uint8"), mode="L")
    return np.asarray(mask.resize(img.size, back))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="u2netp")
    ap.add_argument("--composites", type=int, default=6)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    args = ap.parse_args()
    from daemon.inference import models as M
    from daemon.inference.engine import U2netSession, session_options

    session = U2netSession(M.checked_mask_model(args.models_dir, args.model), session_options(2))
    images = [(n, Image.fromarray(photo(n), "RGB")) for n in PHOTOS]
    images += [(f"composite {7000 + i}", Image.fromarray(wl.composite(7000 + i, (1344, 896))))
               for i in range(args.composites)]
    refs = [np.asarray(session.predict(img)[0]) for _, img in images]  # rembg's, byte for byte
    print(f"model {args.model}; {len(PHOTOS)} photos, {args.composites} composites\n")
    print("| variant | IoU mean | IoU min (image) | photos with IoU < 0.99 | boundary F mean | "
          "boundary F min |")
    print("|---|---:|---:|---|---:|---:|")
    for label, (into, gap, back) in VARIANTS.items():
        rows = [(name, *agreement(variant_mask(session, img, into, gap, back), ref))
                for (name, img), ref in zip(images, refs)]
        ious, bfs = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        worst = min(rows, key=lambda r: r[1])
        low = ", ".join(f"{n} {i:.3f}" for n, i, _ in rows if i < 0.99) or "none"
        print(f"| {label} | {ious.mean():.4f} | {worst[1]:.4f} ({worst[0]}) | {low} | "
              f"{bfs.mean():.4f} | {bfs.min():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
