"""Mask quality per model against exact ground truth, and seconds per image at 1 and 24 MP.

    .venv/bin/python bench/quality.py                # writes bench/quality.md and quality.png
    .venv/bin/python bench/quality.py --quick        # 1 scene per kind, no guided-filter row
    .venv/bin/python bench/quality.py --dump /tmp/q  # also write each scene, truth and masks

Camera size (``--camera N`` scenes per kind at 6000x4000, plus the hard ``outline``):
each scene is drawn at 24 MP with exact alpha, the model's working-size mask is made
as the daemon makes it, and the full-size alpha is scored per ``refine`` mode (``none``:
the bilinear upscale; ``edges``: daemon/imaging/refine.py; ``glass``: edges, then the
see-through alpha of daemon/imaging/see_through.py) and for the rejected
candidate, OpenCV's guided filter on the upscaled mask. The time refinement adds is
measured side by side with today's upscale (Pillow BILINEAR) on the same scenes.
``glass`` must never act on an opaque subject: how much it changes against ``edges``
is reported per kind, with the ``ADVERSARIAL`` opaque cylinders lit like the sweep.

Scenes come from ``bench/groundtruth.py`` (studio composites with exact alpha).
Models: u2netp, u2net and every other model installed in the models dir (any
installed with ``rembgd models install --model NAME --from FILE``). The mask
scored is the raw model mask the daemon uses as alpha (``MaskEngine.predict``).

Metrics, per scene, then averaged per model (and per scene kind):
- IoU of the subject (truth alpha >= 0.5 vs mask >= 128);
- MAE of alpha (mask / 255 vs truth alpha, over the whole image);
- boundary F-measure: precision and recall of boundary pixels within 3 px of
  the other's boundary.
Timings: ``predict`` wall time on ``--threads`` ONNX threads (default 2), after a
warm-up, on the 1 MP scenes and on 24 MP upscales of a few of them; best and
median, since other load on a shared machine only adds time.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import groundtruth as gt  # noqa: E402
from daemon.inference import registry  # noqa: E402
from daemon.inference.engine import Engines  # noqa: E402
from daemon.inference.models import ModelError, mask_model_path  # noqa: E402

from daemon.config import OutputOptions  # noqa: E402
from daemon.imaging import fingerprint as fpmod  # noqa: E402
from daemon.imaging.refine import refine  # noqa: E402
from daemon.imaging.render import predict_mask  # noqa: E402

SIZE_1MP = (1224, 816)
SIZE_24MP = (6000, 4000)
BOUNDARY_PX = 3


# ------------------------------------------------------------------ metrics


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f(pred: np.ndarray, truth: np.ndarray, tol: int = BOUNDARY_PX) -> float:
    """F-measure of boundary pixels matched within ``tol`` px (both binary masks)."""
    from scipy import ndimage

    bp, bt = _boundary(pred), _boundary(truth)
    if not bp.any() or not bt.any():
        return float(bp.any() == bt.any())
    # Only distances <= tol count: a crop around both boundaries with a margin is exact.
    ys, xs = np.nonzero(bp | bt)
    crop = np.s_[max(ys.min() - tol - 1, 0):ys.max() + tol + 2,
                 max(xs.min() - tol - 1, 0):xs.max() + tol + 2]
    bp, bt = bp[crop], bt[crop]
    dist_t = ndimage.distance_transform_edt(~bt)
    dist_p = ndimage.distance_transform_edt(~bp)
    precision = float((dist_t[bp] <= tol).mean())
    recall = float((dist_p[bt] <= tol).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score(mask: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
    pred, truth = mask >= 128, alpha >= 0.5
    union = (pred | truth).sum()
    return {"iou": float((pred & truth).sum() / union) if union else 1.0,
            "mae": float(np.abs(mask.astype(np.float32) / 255 - alpha).mean()),
            "bf": boundary_f(pred, truth)}


# ------------------------------------------------------------------ runs


def models_to_run(models_dir: Path, wanted: list[str] | None) -> tuple[list[str], list[str]]:
    names = wanted or ["u2netp", "u2net"] + [
        s.name for s in registry.local_specs()
        if s.name not in ("u2netp", "u2net") and mask_model_path(models_dir, s.name).is_file()]
    ready, skipped = [], []
    for n in names:
        (ready if mask_model_path(models_dir, n).is_file() else skipped).append(n)
    return ready, skipped


def band_width(mask: np.ndarray, alpha: np.ndarray) -> float:
    """Pixels of partial alpha (0.1 < a < 0.9) per pixel of the true outline's length."""
    from skimage.measure import perimeter

    partial = ((mask > 25) & (mask < 230)).sum()  # 0.1 * 255 < mask < 0.9 * 255
    return float(partial / perimeter(alpha >= 0.5))


def run_model(engines: Engines, name: str, scenes, big: list[np.ndarray], dump: Path | None):
    engine = engines.mask(name)
    engine.predict(scenes[0].rgb)  # warm-up: ORT allocates its arenas on the first run
    rows, refined, t1, t_refine, glassed, t_glass = [], [], [], [], [], []
    for sc in scenes:
        start = time.perf_counter()
        mask = engine.predict(sc.rgb)
        t1.append(time.perf_counter() - start)
        rows.append({"scene": sc.name, "kind": sc.kind, **score(mask, sc.alpha)})
        start = time.perf_counter()
        edges = refine(sc.rgb, mask, "edges")  # at 1 MP the mask is already full size
        t_refine.append(time.perf_counter() - start)
        refined.append({"scene": sc.name, "kind": sc.kind, **score(edges, sc.alpha)})
        start = time.perf_counter()
        glass = refine(sc.rgb, mask, "glass")
        t_glass.append(time.perf_counter() - start)
        glassed.append({"scene": sc.name, "kind": sc.kind, **score(glass, sc.alpha)})
        if dump:
            Image.fromarray(mask).save(dump / f"{sc.name}.{name}.png")
            Image.fromarray(edges).save(dump / f"{sc.name}.{name}.edges.png")
    t24 = []
    for rgb in big:
        for _ in range(2):
            start = time.perf_counter()
            engine.predict(rgb)
            t24.append(time.perf_counter() - start)
    return (rows, refined, _timing(t1), (_timing(t24) if t24 else None), _timing(t_refine),
            glassed, _timing(t_glass))


def _timing(seconds: list[float]) -> dict[str, float]:
    """Best and median: other load on a shared machine only ever adds time."""
    return {"min": float(np.min(seconds)), "median": float(np.median(seconds))}


def _t(t: dict | None) -> str:
    return "-" if t is None else f"{t['min']:.2f} / {t['median']:.2f}"


def _mean(rows, key, kind=None):
    vals = [r[key] for r in rows if kind is None or r["kind"] == kind]
    return float(np.mean(vals))


# ------------------------------------------------------------------ camera size

GUIDED = {"radius": 24, "eps": 60.0}  # the candidate's best of r 12/24, eps 6/60 (uint8 guide)
REPEATS = 2  # timed runs per scene, today's upscale and refinement alternating


def working_mask(engine, rgb: np.ndarray) -> np.ndarray:
    """The mask the daemon caches for ``rgb``: from its working copy, at the working size."""
    small = np.asarray(fpmod.working_copy(Image.fromarray(rgb, "RGB")))
    return predict_mask(engine, small, OutputOptions(), (rgb.shape[1], rgb.shape[0]))


def pillow_bilinear(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Today's full-size mask (the Pillow BILINEAR upscale before refinement), for the timing."""
    return np.asarray(Image.fromarray(mask, "L").resize(size, Image.Resampling.BILINEAR))


def guided_filter(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rejected candidate: OpenCV's guided filter, colour guide, on the upscaled mask."""
    import cv2

    return cv2.ximgproc.guidedFilter(rgb, refine(rgb, mask, "none"), GUIDED["radius"],
                                     GUIDED["eps"])


def _timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_camera(engines: Engines, names: list[str], args) -> tuple[dict, list[dict]]:
    """Scores per model (rows with a ``method``) and side-by-side timings per scene."""
    rows, times = {n: [] for n in names}, []
    for i in range(args.camera):
        for kind in (*gt.KINDS, gt.HARD_EDGE, *gt.ADVERSARIAL):
            sc = gt.scene(kind, args.seed + i, SIZE_24MP)
            for name in names:
                mask = working_mask(engines.mask(name), sc.rgb)
                alphas = {"none": refine(sc.rgb, mask, "none")}
                for _ in range(REPEATS):
                    _, before_wall, before_cpu = _timed(pillow_bilinear, mask, SIZE_24MP)
                    alphas["edges"], wall, cpu = _timed(refine, sc.rgb, mask, "edges")
                    alphas["glass"], g_wall, g_cpu = _timed(refine, sc.rgb, mask, "glass")
                    times.append({"model": name, "kind": kind, "before": before_wall,
                                  "before_cpu": before_cpu, "edges": wall, "edges_cpu": cpu,
                                  "glass": g_wall, "glass_cpu": g_cpu})
                if args.candidate:
                    alphas["guided filter"], wall, cpu = _timed(guided_filter, sc.rgb, mask)
                    times[-1].update(guided=wall, guided_cpu=cpu)
                for method, alpha in alphas.items():
                    row = {"scene": sc.name, "kind": kind, "method": method,
                           **score(alpha, sc.alpha)}
                    if kind == gt.HARD_EDGE:
                        row["band"] = band_width(alpha, sc.alpha)
                    if method == "glass":  # what it changed against edges
                        diff = np.abs(alpha.astype(np.int16) - alphas["edges"])
                        row.update(acts_max=int(diff.max()), acts_n=int((diff > 2).sum()))
                    rows[name].append(row)
                if args.dump:
                    for method, alpha in alphas.items():
                        Image.fromarray(alpha).save(
                            args.dump / f"{sc.name}.24mp.{name}.{method.replace(' ', '-')}.png")
                print(f"24 MP {sc.name} {name}: " + "  ".join(
                    f"{r['method']} BF {r['bf']:.3f} MAE {r['mae']:.4f}"
                    for r in rows[name][-len(alphas):]), flush=True)
    return rows, times


def _rel(new: float, old: float) -> float:
    return (new - old) / old if old else 0.0


def camera_markdown(rows: dict, times: list[dict], args) -> list[str]:
    L = []
    w = L.append
    methods = list(dict.fromkeys(r["method"] for r in next(iter(rows.values()))))
    scored = {n: [r for r in rs if r["kind"] in gt.KINDS] for n, rs in rows.items()}
    w(f"\n## Camera size: {SIZE_24MP[0]}x{SIZE_24MP[1]} (24 MP), refinement\n")
    w(f"{args.camera} scene(s) per kind drawn at 24 MP with exact alpha (strands 1-2 px, the "
      "strap 2 px: camera detail, not a magnified 1 MP scene), plus the hard `outline` scene. "
      "The mask is the daemon's: predicted from the working copy, cached at the working size "
      "(2048 px), then made full size per `refine` mode: `none` is the bilinear upscale, "
      "`edges` is daemon/imaging/refine.py, `glass` is edges then the see-through alpha "
      "(daemon/imaging/see_through.py, opt-in). `guided filter` is the rejected candidate "
      f"(`cv2.ximgproc.guidedFilter`, colour guide, r {GUIDED['radius']}, eps "
      f"{GUIDED['eps']:g}, on the upscaled mask). Band: partial-alpha (0.1-0.9) pixels per "
      "pixel of outline length on `outline`.\n")
    w("| model | refine | IoU | MAE | BF | outline band px | outline IoU |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for name, rs in rows.items():
        for m in methods:
            mine = [r for r in scored[name] if r["method"] == m]
            hard = [r for r in rs if r["kind"] == gt.HARD_EDGE and r["method"] == m]
            w(f"| {name} | {m} | {_mean(mine, 'iou'):.3f} | {_mean(mine, 'mae'):.4f} | "
              f"{_mean(mine, 'bf'):.3f} | {_mean(hard, 'band'):.1f} | {_mean(hard, 'iou'):.4f} |")
    w("\nPer scene kind, BF / MAE, and the change of `edges` and `glass` against `none` "
      "(relative):\n")
    w("| model | refine | " + " | ".join(gt.KINDS) + " |")
    w("|---|---|" + "---:|" * len(gt.KINDS))
    for name in rows:
        for m in methods:
            mine = [r for r in scored[name] if r["method"] == m]
            w(f"| {name} | {m} | " + " | ".join(
                f"{_mean(mine, 'bf', k):.3f} / {_mean(mine, 'mae', k):.4f}" for k in gt.KINDS) + " |")
        none = [r for r in scored[name] if r["method"] == "none"]
        for m in ("edges", "glass"):
            mine = [r for r in scored[name] if r["method"] == m]
            w(f"| {name} | {m} vs none | " + " | ".join(
                f"BF {_rel(_mean(mine, 'bf', k), _mean(none, 'bf', k)):+.0%} / "
                f"MAE {_rel(_mean(mine, 'mae', k), _mean(none, 'mae', k)):+.0%}"
                for k in gt.KINDS) + " |")
    w("\nTargets (issue 18), per model:\n")
    for name, rs in rows.items():
        none = [r for r in scored[name] if r["method"] == "none"]
        edges = [r for r in scored[name] if r["method"] == "edges"]
        hard = [r for r in rs if r["kind"] == gt.HARD_EDGE and r["method"] == "edges"]
        worst = max(max(-_rel(_mean(edges, 'bf', k), _mean(none, 'bf', k)),
                        _rel(_mean(edges, 'mae', k), _mean(none, 'mae', k)))
                    for k in gt.KINDS)
        kind_mae = np.mean([_rel(_mean(edges, 'mae', k), _mean(none, 'mae', k)) for k in gt.KINDS])
        w(f"- {name}: outline band {_mean(hard, 'band'):.1f} px (target <= 4), IoU "
          f"{_mean(hard, 'iou'):.4f} (>= 0.97); BF {_rel(_mean(edges, 'bf'), _mean(none, 'bf')):+.0%} "
          f"(>= +50%); MAE {_rel(_mean(edges, 'mae'), _mean(none, 'mae')):+.0%} over all scenes, "
          f"{kind_mae:+.0%} as the mean of the per-kind changes (<= -30%); worst kind change "
          f"{worst:+.1%} (a loss is positive; <= +2%).")
        glass = [r for r in scored[name] if r["method"] == "glass"]
        w(f"- {name} with `refine: glass`: MAE {_rel(_mean(glass, 'mae'), _mean(none, 'mae')):+.0%} "
          f"over all scenes (<= -30%), glass scene {_mean(none, 'mae', 'glass'):.4f} -> "
          f"{_mean(glass, 'mae', 'glass'):.4f}; BF {_rel(_mean(glass, 'bf'), _mean(none, 'bf')):+.0%}.")
    kinds = list(dict.fromkeys(r["kind"] for r in next(iter(rows.values()))))
    w("\nWhat `glass` changes against `edges` (max |difference| in 1/255 / pixels changed by more "
      "than 2/255), per kind: it must be 0 / 0 on every opaque subject. `shaded` is an opaque "
      "grey cylinder lit by the sweep's own light (its interior follows the backdrop, "
      "proportionally); `shaded-fill` the same with a uniform fill light added, which in the "
      "model I = alpha T + (1 - alpha) B cannot be told from a glass: the reason `glass` is "
      "opt-in, not part of `edges`.\n")
    w("| model | " + " | ".join(kinds) + " |")
    w("|---|" + "---:|" * len(kinds))
    for name, rs in rows.items():
        g = {r["kind"]: r for r in rs if r["method"] == "glass"}
        w(f"| {name} | " + " | ".join(f"{g[k]['acts_max']} / {g[k]['acts_n']}" for k in kinds)
          + " |")
    w(f"\nTime to make the full-size mask at 24 MP, seconds, best / median over "
      f"{len(times)} runs ({REPEATS} per scene and model, today's upscale and `edges` "
      f"alternating in one process); CPU is the process's CPU time. Load average at the start "
      f"{args.load:.2f}, at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs: the "
      "machine is shared, so wall times carry other work; the difference is the figure.\n")
    w("| step | wall | CPU |")
    w("|---|---:|---:|")

    def row(label, key):
        vals = [t[key] for t in times if key in t]
        cpu = [t[key + "_cpu"] for t in times if key in t]
        w(f"| {label} | {min(vals):.3f} / {np.median(vals):.3f} | "
          f"{min(cpu):.3f} / {np.median(cpu):.3f} |")

    row("today: Pillow BILINEAR upscale", "before")
    row("`refine: edges` (upscale included)", "edges")
    added = [t["edges"] - t["before"] for t in times]
    added_cpu = [t["edges_cpu"] - t["before_cpu"] for t in times]
    w(f"| added by `edges` (paired difference) | {min(added):+.3f} / {np.median(added):+.3f} | "
      f"{min(added_cpu):+.3f} / {np.median(added_cpu):+.3f} |")
    row("`refine: glass` (upscale and edges included)", "glass")
    added = [t["glass"] - t["edges"] for t in times]
    added_cpu = [t["glass_cpu"] - t["edges_cpu"] for t in times]
    w(f"| added by `glass` over `edges` (paired difference) | {min(added):+.3f} / "
      f"{np.median(added):+.3f} | {min(added_cpu):+.3f} / {np.median(added_cpu):+.3f} |")
    if any("guided" in t for t in times):
        row("candidate: guided filter (upscale excluded)", "guided")
    return L


# ------------------------------------------------------------------ report


def write_markdown(path: Path, results: dict, args, skipped: list[str], n_scenes: int,
                   elapsed: float, camera: list[str]) -> None:
    L = []
    w = L.append
    w("# Mask quality against exact ground truth\n")
    w(f"Command: `.venv/bin/python bench/quality.py --seed {args.seed} --per-kind {args.per_kind} "
      f"--big {args.big} --camera {args.camera} --threads {args.threads}"
      f"{'' if args.candidate else ' --no-candidate'}`  ")
    w(f"Generator: `bench/groundtruth.py` version {gt.GENERATOR_VERSION}, seed {args.seed}, "
      f"{n_scenes} scenes of {SIZE_1MP[0]}x{SIZE_1MP[1]} (1.0 MP), {args.per_kind} per kind "
      f"({', '.join(gt.KINDS)})  ")
    w(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, ONNX Runtime on {args.threads} "
      f"threads, Python {platform.python_version()}; load average at start "
      f"{args.load:.2f} (the machine is shared: timings carry that noise); "
      f"run took {elapsed:.0f} s\n")
    w("IoU: subject (alpha >= 0.5) overlap. MAE: mean |mask - alpha| over the image. "
      f"BF: boundary F-measure within {BOUNDARY_PX} px. Time: seconds per image, best / median "
      f"(`MaskEngine.predict`, after a warm-up) over the {n_scenes} scenes at 1 MP and over "
      f"{args.big} images x 2 runs at 24 MP ({SIZE_24MP[0]}x{SIZE_24MP[1]}, upscaled scenes).\n")
    w("| model | file MB | IoU | MAE | BF | s/img 1 MP best / median | s/img 24 MP best / median "
      "| licence |")
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        w(f"| {name} | {r['mb']:.1f} | {_mean(r['rows'], 'iou'):.3f} | "
          f"{_mean(r['rows'], 'mae'):.4f} | {_mean(r['rows'], 'bf'):.3f} | {_t(r['t1'])} | "
          f"{_t(r['t24'])} | {registry.spec(name).licence} |")
    w("\nThe same 1 MP scenes with `refine: edges` (at 1 MP the working mask is already full "
      "size; refinement re-decides its soft band from the pixels), and the time it adds, "
      "best / median:\n")
    w("| model | IoU | MAE | BF | refine s/img best / median |")
    w("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        w(f"| {name} + edges | {_mean(r['refined'], 'iou'):.3f} | "
          f"{_mean(r['refined'], 'mae'):.4f} | {_mean(r['refined'], 'bf'):.3f} | "
          f"{r['t_refine']['min']:.3f} / {r['t_refine']['median']:.3f} |")
    for name, r in results.items():
        w(f"| {name} + glass | {_mean(r['glassed'], 'iou'):.3f} | "
          f"{_mean(r['glassed'], 'mae'):.4f} | {_mean(r['glassed'], 'bf'):.3f} | "
          f"{r['t_glass']['min']:.3f} / {r['t_glass']['median']:.3f} |")
    w("\nPer scene kind (IoU / BF / MAE):\n")
    w("| model | " + " | ".join(gt.KINDS) + " |")
    w("|---|" + "---:|" * len(gt.KINDS))
    for name, r in results.items():
        cells = [f"{_mean(r['rows'], 'iou', k):.3f} / {_mean(r['rows'], 'bf', k):.3f} / "
                 f"{_mean(r['rows'], 'mae', k):.4f}" for k in gt.KINDS]
        w(f"| {name} | " + " | ".join(cells) + " |")
    if skipped:
        w(f"\nNot installed, so not measured: {', '.join(skipped)} "
          "(`rembgd models install --model NAME`).")
    w("\nThe scenes are synthetic: shapes textured with real photos on studio sweeps, with "
      "hair-like strands, a 2 px strap, a hole, glass at alpha 0.3-0.6 and a white box on "
      "white, plus soft floor shadows that are not subject. They rank models on those "
      "difficulties; absolute figures on real studio photos will differ.")
    w("\nFor glass the truth is alpha 0.3-0.6 (below the 0.5 subject threshold) inside opaque "
      "walls; mask models answer with an opaque glass, so there IoU is low by definition "
      "and MAE is the figure to compare.")
    if {"u2netp", "u2net"} <= set(results):
        w("\n## Which model to pick\n")
        w(pick_paragraph(results))
    L += camera
    path.write_text("\n".join(L) + "\n")


def _t1(t: dict | None) -> str:
    return "-" if t is None else f"{t['min']:.2f} s"


def pick_paragraph(results: dict) -> str:
    """The model-choice paragraph (docs/benchmarks.md, bench/quality.md), with this run's figures."""
    p, f = results["u2netp"], results["u2net"]

    def fig(r, kind=None):
        return (f"IoU {_mean(r['rows'], 'iou', kind):.3f}, "
                f"boundary F {_mean(r['rows'], 'bf', kind):.3f}")

    return (
        f"**u2netp** (default, {p['mb']:.1f} MB, MIT, provisioned offline by "
        f"`rembgd models install`) is the fast choice: {p['t1']['min']:.2f} s per 1 MP image on 2 cores "
        f"({fig(p)} on the synthetic studio set). **u2net** ({f['mb']:.0f} MB, Apache-2.0 "
        f"weights, `rembgd models install --model u2net`, fetched from the package index) costs "
        f"{f['t1']['min']:.2f} s per 1 MP image ({f['t1']['min'] / p['t1']['min']:.1f}x) and is "
        f"cleaner at edges "
        f"({fig(f)}); the gain is largest on hair ({fig(p, 'portrait')} -> "
        f"{fig(f, 'portrait')}) and on white-on-white products ({fig(p, 'white-on-white')} -> "
        f"{fig(f, 'white-on-white')}). At 24 MP: {_t1(p['t24'])} vs {_t1(f['t24'])} per image "
        "(the model sees 320x320 either way). Neither renders glass as "
        "semi-transparent. Pick u2netp for volume and simple product shots, u2net for people, "
        "animals and light-on-light products. IS-Net and BiRefNet (not measured here) take "
        "1024x1024 inputs; no registry package ships them under a usable licence: install a "
        "file you have with "
        "`rembgd models install --model isnet-general-use --from FILE.onnx`. rembg's own default, "
        "bria-rmbg, is CC BY-NC 4.0 (commercial use needs a paid agreement with BRIA): rembgd "
        "never picks it and installs it only with `--accept-licence`. To switch one watch pair, "
        "install u2net and set `options: {model: u2net}` on that pair.")


def write_plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(gt.KINDS))
    width = 0.8 / max(len(names), 1)
    for metric, ax, label in (("iou", axes[0], "IoU (alpha >= 0.5)"),
                              ("bf", axes[1], f"boundary F ({BOUNDARY_PX} px)")):
        for i, n in enumerate(names):
            ax.bar(x + i * width, [_mean(results[n]["rows"], metric, k) for k in gt.KINDS],
                   width, label=n)
        ax.set_xticks(x + width * (len(names) - 1) / 2, gt.KINDS, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(label)
    ax = axes[2]
    for i, n in enumerate(names):
        r, colour = results[n], f"C{i}"
        ax.scatter([r["t1"]["min"]], [_mean(r["rows"], "bf")], s=60, color=colour,
                   label=f"{n} 1 MP")
        if r["t24"] is not None:
            ax.scatter([r["t24"]["min"]], [_mean(r["rows"], "bf")], s=60, marker="x", color=colour,
                       label=f"{n} 24 MP")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image, best run (2 threads)")
    ax.set_ylabel("mean boundary F")
    ax.set_title("quality vs time")
    axes[0].legend(fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    p.add_argument("--model", action="append", help="model to score (default: all installed)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--per-kind", type=int, default=3, help="scenes per kind (5 kinds)")
    p.add_argument("--big", type=int, default=2, help="24 MP images to time (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "quality.md")
    p.add_argument("--camera", type=int, default=1,
                   help="scenes per kind at 24 MP for the refinement table (0: none)")
    p.add_argument("--no-candidate", dest="candidate", action="store_false",
                   help="skip the guided-filter candidate at 24 MP (slow: seconds per scene)")
    p.add_argument("--quick", action="store_true",
                   help="--per-kind 1 --big 1 --camera 1 --no-candidate")
    p.add_argument("--dump", type=Path, help="write scenes, truth and masks here")
    args = p.parse_args(argv)
    if args.quick:
        args.per_kind, args.big, args.camera, args.candidate = 1, 1, 1, False

    start = time.perf_counter()
    args.load = os.getloadavg()[0]
    scenes = gt.scenes(args.seed, args.per_kind, SIZE_1MP)
    big = [np.asarray(Image.fromarray(sc.rgb).resize(SIZE_24MP, Image.Resampling.BICUBIC))
           for sc in scenes[:args.big]]
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for sc in scenes:
            Image.fromarray(sc.rgb).save(args.dump / f"{sc.name}.png")
            Image.fromarray(np.rint(sc.alpha * 255).astype(np.uint8)).save(
                args.dump / f"{sc.name}.truth.png")
    ready, skipped = models_to_run(args.models_dir, args.model)
    engines = Engines(args.models_dir, threads=args.threads)
    results = {}
    for name in ready:
        try:
            rows, refined, t1, t24, t_refine, glassed, t_glass = run_model(
                engines, name, scenes, big, args.dump)
        except ModelError as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            skipped.append(name)
            continue
        mb = mask_model_path(args.models_dir, name).stat().st_size / 1e6
        results[name] = {"rows": rows, "refined": refined, "t1": t1, "t24": t24, "mb": mb,
                         "t_refine": t_refine, "glassed": glassed, "t_glass": t_glass}
        print(f"{name}: IoU {_mean(rows, 'iou'):.3f}  MAE {_mean(rows, 'mae'):.4f}  "
              f"BF {_mean(rows, 'bf'):.3f}  {_t(t1)} s @1MP  {_t(t24)} s @24MP (best / median)",
              flush=True)
    camera = camera_markdown(*run_camera(engines, list(results), args), args) if (
        args.camera and results) else []
    elapsed = time.perf_counter() - start
    write_markdown(args.out, results, args, skipped, len(scenes), elapsed, camera)
    write_plot(args.out.with_suffix(".png"), results)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
