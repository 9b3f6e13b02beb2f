"""Calibrate review routing: does a low mask confidence catch the bad masks?

    .venv/bin/python bench/routing.py                 # writes bench/routing.md
    .venv/bin/python bench/routing.py --per-kind 2    # quicker
    .venv/bin/python bench/routing.py --fit           # fit the weights on the calibration seeds

Scenes: ``bench/quality.py``'s studio composites (``bench/groundtruth.py``,
exact alpha), each also in harder variants that keep the alpha exact:

- ``washed``: contrast cut to a third (an affine map of the pixels, so
  ``a * subject + (1 - a) * backdrop`` still holds);
- ``dark``: underexposed to a quarter, with more sensor noise;
- ``cropped``: a window that cuts the subject at a frame side;
- ``props``: photo-textured props on the backdrop, away from the subject
  (alpha 0 there: not subject);
- ``busy``: a photo for backdrop, faded in from 12 px off the subject.

Each is run through the daemon's own mask path (``working_copy`` ->
``predict_mask`` with u2netp), scored against the truth (IoU of alpha >= 0.5,
as in ``bench/quality.py``) and given ``confidence.score``. The routing
weights (``--fit``: a logistic regression of "bad" on the signals' excesses, the
good and bad masks only) and threshold are chosen on the calibration seeds and
reported on held-out seeds:
recall = share of the bad masks (IoU < 0.8) routed to review, false routing =
share of the good masks (IoU > 0.95) routed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import groundtruth as gt  # noqa: E402
from quality import score as truth_score  # noqa: E402
from daemon.config import OutputOptions  # noqa: E402
from daemon.config.schema import ReviewConfig  # noqa: E402
from daemon.imaging import confidence  # noqa: E402
from daemon.imaging.fingerprint import working_copy  # noqa: E402
from daemon.imaging.render import predict_mask  # noqa: E402
from daemon.inference.engine import Engines  # noqa: E402

VARIANTS = ("plain", "washed", "dark", "cropped", "props", "busy")
BAD_IOU, GOOD_IOU = 0.8, 0.95
TARGET_RECALL, TARGET_FALSE = 0.80, 0.10
# the signals were developed looking at these seeds' masks; weights and threshold fitted on them
CALIBRATION_SEEDS = (20240601, 777000, 31337)
HOLDOUT_SEEDS = (4242, 90210)  # never looked at while tuning: the reported figures


# ------------------------------------------------------------------ harder variants


def _photo(name: str, h: int, w: int) -> np.ndarray:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((w, h))
    return np.asarray(img, np.float32)


def _away(alpha: np.ndarray, px: float) -> np.ndarray:
    """0 on and near the subject, rising to 1 at ``px`` pixels from any alpha > 0."""
    from scipy import ndimage

    return np.clip(ndimage.distance_transform_edt(alpha <= 0) / px - 1, 0, 1)


def variant(sc: gt.Scene, name: str, seed: int) -> gt.Scene:
    rng = np.random.default_rng([seed, VARIANTS.index(name)])
    rgb, alpha = sc.rgb.astype(np.float32), sc.alpha
    h, w = alpha.shape
    if name == "washed":
        rgb = rgb * 0.33 + rng.uniform(110, 160)
    elif name == "dark":
        rgb = rgb * 0.25 + rng.normal(0, 3.0, rgb.shape)
    elif name == "cropped":
        ys, xs = np.nonzero(alpha > 0.5)
        cut = rng.choice(["left", "right", "top"])
        if cut == "left":
            x0 = int(np.percentile(xs, rng.uniform(25, 45)))
            rgb, alpha = rgb[:, x0:], alpha[:, x0:]
        elif cut == "right":
            x1 = int(np.percentile(xs, rng.uniform(55, 75)))
            rgb, alpha = rgb[:, :x1], alpha[:, :x1]
        else:
            y0 = int(np.percentile(ys, rng.uniform(20, 40)))
            rgb, alpha = rgb[y0:], alpha[y0:]
    elif name in ("props", "busy"):
        photo = _photo(rng.choice(["rocket", "coffee", "astronaut", "immunohistochemistry"]), h, w)
        if name == "props":
            cover = Image.new("L", (w, h), 0)
            d = ImageDraw.Draw(cover)
            for _ in range(int(rng.integers(2, 5))):
                cx, cy = rng.uniform(0, w), rng.uniform(0.3 * h, h)
                rx, ry = rng.uniform(0.03, 0.1) * w, rng.uniform(0.05, 0.2) * h
                shape = d.ellipse if rng.random() < 0.5 else d.rectangle
                shape((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
            weight = np.asarray(cover, np.float32) / 255 * _away(alpha, 12)
        else:
            weight = _away(alpha, 12)
        rgb = rgb * (1 - weight[..., None]) + photo * weight[..., None]
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return gt.Scene(f"{sc.name}-{name}", sc.kind, rgb, np.ascontiguousarray(alpha))


# ------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Row:
    scene: str
    kind: str
    variant: str
    iou: float
    conf: confidence.Confidence
    ms: float  # confidence.score on the working-size mask


def measure(engines: Engines, seed: int, per_kind: int, log=print) -> list[Row]:
    engine, options = engines.mask("u2netp"), OutputOptions()
    confidence.score(np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8))  # imports
    rows = []
    for base in gt.scenes(seed, per_kind):
        for v in VARIANTS:
            sc = base if v == "plain" else variant(base, v, seed)
            h, w = sc.alpha.shape
            small = np.asarray(working_copy(Image.fromarray(sc.rgb)))
            mask = predict_mask(engine, small, options, (w, h))
            start = time.perf_counter()
            conf = confidence.score(mask, small)
            ms = (time.perf_counter() - start) * 1000
            truth = np.asarray(Image.fromarray(sc.alpha).resize(mask.shape[::-1],
                                                                Image.Resampling.BOX))
            rows.append(Row(sc.name, sc.kind, v, truth_score(mask, truth)["iou"], conf, ms))
            log(f"{sc.name:34s} IoU {rows[-1].iou:.3f} confidence {conf.score:.3f} "
                f"{'; '.join(conf.reasons)}", flush=True)
    return rows


def routing(rows: list[Row], threshold: float) -> dict:
    bad = [r for r in rows if r.iou < BAD_IOU]
    good = [r for r in rows if r.iou > GOOD_IOU]
    routed = [r for r in rows if r.conf.score < threshold]
    caught = sum(r.conf.score < threshold for r in bad)
    return {"n": len(rows), "bad": len(bad), "good": len(good), "routed": len(routed),
            "recall": caught / len(bad) if bad else float("nan"),
            "false": sum(r.conf.score < threshold for r in good) / len(good) if good else 0.0,
            "precision": (sum(r.iou < BAD_IOU for r in routed) / len(routed)) if routed else 1.0,
            "precision_lt95": (sum(r.iou <= GOOD_IOU for r in routed) / len(routed))
            if routed else 1.0}


def choose_threshold(rows: list[Row]) -> float:
    """The threshold that catches the most bad masks while routing at most
    TARGET_FALSE of the good ones; of a plateau of such thresholds, its middle."""
    grid = [float(t) for t in np.round(np.arange(0.05, 0.96, 0.01), 2)]
    ok = [(routing(rows, t)["recall"], t) for t in grid
          if routing(rows, t)["false"] <= TARGET_FALSE]
    best = max(r for r, _ in ok)
    plateau = [t for r, t in ok if r == best]
    return round(float(np.median(plateau)), 2)


def fit_weights(rows: list[Row], l2: float = 0.01, steps: int = 4000) -> np.ndarray:
    """Logistic regression of "bad" (IoU < BAD_IOU) against "good" (IoU > GOOD_IOU) on each
    signal's excess (``confidence.excess``): the weights of ``confidence.WEIGHTS``."""
    rows = [r for r in rows if r.iou < BAD_IOU or r.iou > GOOD_IOU]
    x = np.array([list(confidence.excess(r.conf.signals).values()) for r in rows])
    y = np.array([r.iou < BAD_IOU for r in rows], float)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    z, w, b = (x - mu) / sd, np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        err = 1 / (1 + np.exp(-(z @ w + b))) - y
        w -= z.T @ err / len(y) + l2 * w
        b -= err.mean()
    return w / sd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    p.add_argument("--per-kind", type=int, default=3, help="base scenes per kind per split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "routing.md")
    p.add_argument("--fit", action="store_true",
                   help="print weights fitted on the calibration seeds; skip the held-out ones")
    args = p.parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    engines = Engines(args.models_dir, threads=args.threads)
    calib = [r for seed in CALIBRATION_SEEDS for r in measure(engines, seed, args.per_kind)]
    if args.fit:
        print("confidence.WEIGHTS (uncertain, fragments, frame, see-through, edge):",
              tuple(float(x) for x in np.round(fit_weights(calib), 2)))
        return 0
    held = [r for seed in HOLDOUT_SEEDS for r in measure(engines, seed, args.per_kind)]
    threshold = choose_threshold(calib)
    elapsed = time.perf_counter() - start
    write_markdown(args.out, calib, held, threshold, args, load, elapsed)
    print(f"threshold {threshold}: calibration {routing(calib, threshold)}")
    print(f"held out (seeds {HOLDOUT_SEEDS}): {routing(held, threshold)}")
    print(f"wrote {args.out} in {elapsed:.0f} s")
    return 0


def _spearman(rows: list[Row]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr([r.iou for r in rows], [r.conf.score for r in rows]).statistic)


def _split_line(name: str, rows: list[Row], t: float) -> str:
    r = routing(rows, t)
    return (f"| {name} | {r['n']} | {r['bad']} | {r['good']} | {r['routed']} | "
            f"**{r['recall']:.0%}** | **{r['false']:.0%}** | {r['precision']:.0%} | "
            f"{r['precision_lt95']:.0%} | {_spearman(rows):.2f} |")


def _count(labels) -> str:
    from collections import Counter

    return ", ".join(f"{k} {n}" for k, n in Counter(labels).most_common()) or "none"


def write_markdown(path, calib, held, threshold, args, load, elapsed) -> None:
    L = []
    w = L.append
    no_glass = [r for r in held if r.kind != "glass"]
    ms = np.array([r.ms for r in calib + held])
    w("# Review routing: mask confidence against exact ground truth\n")
    w(f"Command: `.venv/bin/python bench/routing.py --per-kind {args.per_kind} "
      f"--threads {args.threads}`  ")
    w(f"Scenes: `bench/groundtruth.py` version {gt.GENERATOR_VERSION}, {args.per_kind} per kind "
      f"per seed, each plain and in {len(VARIANTS) - 1} harder variants "
      f"({', '.join(VARIANTS[1:])}; see the module docstring), 1224x816; model u2netp through "
      "the daemon's own mask path.  ")
    w(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.2f} at start "
      f"(shared); run took {elapsed:.0f} s.\n")
    w("Calibration: the signals in `daemon/imaging/confidence.py` were developed while looking "
      f"at the masks of seeds {', '.join(map(str, CALIBRATION_SEEDS))}; their weights were fitted "
      "on those seeds (`--fit`, a logistic regression) and this script picks the threshold on "
      f"them (the most bad masks caught with at most {TARGET_FALSE:.0%} of the good ones routed; "
      f"the middle of that plateau): **{threshold:.2f}** (the default of a pair's "
      f"`review.min_confidence`: {ReviewConfig().min_confidence}). Held out: seeds "
      f"{', '.join(map(str, HOLDOUT_SEEDS))}, never looked at while tuning; their row is the "
      "result.\n")
    w(f"Bad: IoU < {BAD_IOU}; good: IoU > {GOOD_IOU}. Recall: bad masks routed to review "
      f"(target >= {TARGET_RECALL:.0%}). False routing: good masks routed (target <= "
      f"{TARGET_FALSE:.0%}). Precision: routed masks that are bad (and that are not good, "
      "IoU <= 0.95). Spearman: rank correlation of score and IoU.\n")
    w("| split | masks | bad | good | routed | recall | false routing | precision (bad) "
      "| precision (not good) | Spearman |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    w(_split_line("calibration (in-sample)", calib, threshold))
    w(_split_line(f"**held out (seeds {', '.join(map(str, HOLDOUT_SEEDS))})**", held, threshold))
    w(_split_line("held out, without glass", no_glass, threshold))
    w(_split_line("held out, plain scenes only (bench/quality.py's)",
                  [r for r in held if r.variant == "plain"], threshold))
    h = routing(held, threshold)
    w(f"\nHeld-out verdict: recall {h['recall']:.0%} "
      f"({'meets' if h['recall'] >= TARGET_RECALL else 'misses'} the >= {TARGET_RECALL:.0%} "
      f"target), false routing {h['false']:.0%} "
      f"({'meets' if h['false'] <= TARGET_FALSE else 'misses'} the <= {TARGET_FALSE:.0%} target).")
    w("\nGlass: the truth is alpha 0.3-0.6 inside opaque walls, so its IoU is low by "
      "definition (bench/quality.md); u2netp answers with a clean opaque tumbler, which only "
      "the see-through signal (the interior follows the backdrop's sweep, dimmed) can flag.\n")
    w("Where the held-out errors come from:\n")
    bad = [r for r in held if r.iou < BAD_IOU]
    glass = [r for r in bad if r.kind == "glass"]
    w(f"- bad masks that are glass: {len(glass)} of {len(bad)}; routed: "
      f"{sum(r.conf.score < threshold for r in glass)}")
    missed = [r for r in bad if r.conf.score >= threshold]
    w(f"- bad masks missed, by variant: {_count(r.variant for r in missed)}")
    false = [r for r in held if r.iou > GOOD_IOU and r.conf.score < threshold]
    w(f"- good masks routed, by variant: {_count(r.variant for r in false)}; by main reason: "
      f"{_count(r.conf.reasons[0].split(' (')[0] if r.conf.reasons else 'none' for r in false)}")
    w("")
    w("Held out, per variant (mean IoU / mean score / routed):\n")
    w("| variant | " + " | ".join(gt.KINDS) + " |")
    w("|---|" + "---|" * len(gt.KINDS))
    for v in VARIANTS:
        cells = []
        for k in gt.KINDS:
            rs = [r for r in held if r.variant == v and r.kind == k]
            cells.append(f"{np.mean([r.iou for r in rs]):.2f} / "
                         f"{np.mean([r.conf.score for r in rs]):.2f} / "
                         f"{sum(r.conf.score < threshold for r in rs)}/{len(rs)}")
        w(f"| {v} | " + " | ".join(cells) + " |")
    w("\nThreshold sweep (recall / false routing):\n")
    w("| threshold | calibration | held out |")
    w("|---:|---|---|")
    for t in sorted({0.2, 0.3, 0.4, 0.5, threshold, 0.7, 0.8}):
        a, b = routing(calib, t), routing(held, t)
        w(f"| {t:.2f} | {a['recall']:.0%} / {a['false']:.0%} | {b['recall']:.0%} / "
          f"{b['false']:.0%} |")
    w("\nHeld out, what the routing got wrong:\n")
    for r in held:
        if (r.iou < BAD_IOU) == (r.conf.score < threshold) or BAD_IOU <= r.iou <= GOOD_IOU:
            continue
        what = "missed" if r.iou < BAD_IOU else "routed a good mask"
        w(f"- {what}: {r.scene} ({r.variant}) IoU {r.iou:.2f}, score {r.conf.score:.2f}"
          f"{': ' + '; '.join(r.conf.reasons) if r.conf.reasons else ''}")
    w(f"\nCost of `confidence.score` on the working-size mask and working copy (1224x816): "
      f"median {np.median(ms):.1f} ms, 95th percentile {np.percentile(ms, 95):.1f} ms "
      "(shared machine; absolute times carry that load).")
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
