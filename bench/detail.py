"""The detail stage and despill at camera size, against exact alpha.

    PYTHONPATH=. .venv/bin/python bench/detail.py                 # writes bench/detail.md
    PYTHONPATH=. .venv/bin/python bench/detail.py --seeds 1 --quick

Scenes (bench/detailscenes.py, 6000 x 4000, exact alpha): a bag with a strap, a cord,
a chain of 2 px rings and a fringe of 2-4 px strands, a floor shadow, dust specks, a
paper seam and texture, on ``white``, ``grey`` and ``coloured`` sweeps, and the ``busy``
control (the same bag in front of a scikit-image photo). The working mask is u2netp's,
made as the daemon makes it. Scored per scene: ``edges`` (refine alone) against
``detail`` (refine, then daemon/imaging/detail.py):

- recall per structure: sum(min(alpha, truth)) / sum(truth) on its pixels outside the body;
- mean alpha on the floor shadow, the specks and the seam (truth 0 there);
- alpha MAE over the whole frame and outside the structures (grown by 16 px);
- edge colour: output and truth composited over black, white and magenta; mean
  |difference| (0-255) on pixels of partial truth where the output's alpha is within 0.1
  of it: the photo's pixels (no despill), despill (daemon/imaging/despill.py),
  pymatting's ``estimate_foreground_ml`` (on the subject's box, same alpha) and the
  subject's true colour under the same alpha (the floor that alpha's error leaves).

Then what must not get worse, at 24 MP: bench/groundtruth.py's kinds (MAE, edges vs
detail), the hard ``outline`` (partial band per outline px, target <= 4) and a soft disc
(sigma 12 px, band >= 10 px); the real scikit-image photos (mean |alpha change|, 0-255).
Cost: the stage (backdrop, detail, despill) against refine alone, interleaved, at 24 MP
and 1 MP (median of the repeats), and its peak of traced allocations (tracemalloc).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import detailscenes as ds  # noqa: E402
import groundtruth as gt  # noqa: E402
from quality import band_width, working_mask  # noqa: E402

from daemon.imaging import backdrop, despill, detail  # noqa: E402
from daemon.imaging.refine import refine  # noqa: E402
from daemon.inference.engine import Engines  # noqa: E402

SIZE_24MP, SIZE_1MP = (6000, 4000), (1224, 816)
BACKGROUNDS = {"black": (0, 0, 0), "white": (1, 1, 1), "magenta": (1, 0, 1)}
TARGETS = {"strap": 0.95, "cord": 0.90, "chain": 0.80, "strands": 0.80}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def stage(rgb, mask, alpha):
    """The detail stage and despill on a refined ``alpha`` (in place): (alpha, patch, backdrop)."""
    bd = backdrop.fit(rgb, mask)
    detail.recover(rgb, mask, alpha, bd)
    return alpha, despill.foreground(rgb, alpha, bd), bd


def recall(alpha8, truth):
    return float(np.minimum(alpha8 / 255, truth).sum() / truth.sum())


def edge_colour(alpha8, rgb_out, truth, colour, box=None):
    """Mean |composite - truth's| (0-255) over each background, on partial-truth pixels
    whose alpha is within 0.1 (inside ``box`` = (y0, y1, x0, x1) if given)."""
    a = alpha8.astype(np.float32) / 255
    part = (truth > 0) & (truth < 1) & (np.abs(a - truth) < 0.1)
    if box is not None:
        inside = np.zeros_like(part)
        inside[box[0]:box[1], box[2]:box[3]] = True
        part &= inside
    ys, xs = np.nonzero(part)
    ao, at = a[ys, xs, None], truth[ys, xs, None]
    fo = rgb_out[ys, xs].astype(np.float32)
    fo = fo / 255 if rgb_out.dtype == np.uint8 else fo
    ft = colour[ys, xs]
    return {k: float(np.abs(ao * fo + (1 - ao) * np.float32(v) - at * ft
                            - (1 - at) * np.float32(v)).mean() * 255)
            for k, v in BACKGROUNDS.items()}, len(ys)


def subject_box(truth, margin=40):
    ys, xs = np.nonzero(truth > 0)
    h, w = truth.shape
    return (max(ys.min() - margin, 0), min(ys.max() + margin, h), max(xs.min() - margin, 0),
            min(xs.max() + margin, w))


def run_detail_scenes(engine, args, log):
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        for sweep in ds.SWEEPS:
            sc = ds.scene(sweep, seed, SIZE_24MP)
            mask = working_mask(engine, sc.rgb)
            edges = refine(sc.rgb, mask, "edges")
            found, patch, bd = stage(sc.rgb, mask, edges.copy())
            row = {"scene": sc.name, "sweep": sweep, "plain": bd is not None and bd.plain}
            for name, part in sc.parts.items():
                row[f"edges_{name}"] = recall(edges, part)
                row[f"detail_{name}"] = recall(found, part)
            for name in ("shadow", "specks", "seam"):
                sel = getattr(sc, name)
                row[name] = float(found[sel].mean() / 255) if sel is not None and sel.any() else None
                row[f"edges_{name}"] = (float(edges[sel].mean() / 255)
                                        if sel is not None and sel.any() else None)
            import cv2
            structures = np.zeros(sc.alpha.shape, np.uint8)
            for part in sc.parts.values():
                structures |= (part > 0).astype(np.uint8)
            away = cv2.dilate(structures, np.ones((33, 33), np.uint8)) == 0
            for name, a in (("edges", edges), ("detail", found)):
                err = np.abs(a / 255 - sc.alpha)
                row[f"mae_{name}"] = float(err.mean())
                row[f"mae_out_{name}"] = float(err[away].mean())
            raw, n = edge_colour(found, sc.rgb, sc.alpha, sc.colour)
            row["colour_raw"], row["colour_n"] = raw, n
            # the floor this alpha leaves: the subject's true colour in its partial pixels
            ideal = sc.rgb.copy()
            sel = (found >= despill.LOW) & (found <= despill.HIGH)
            ideal[sel] = np.rint(sc.colour[sel] * 255).astype(np.uint8)
            row["colour_truth"] = edge_colour(found, ideal, sc.alpha, sc.colour)[0]
            del ideal, sel
            if patch is not None:
                row["colour_despill"] = edge_colour(found, patch.onto(sc.rgb.copy()), sc.alpha,
                                                    sc.colour)[0]
            else:
                row["colour_despill"] = raw
            # the colours around the edge (what a busy backdrop gets), on every sweep
            local = despill.foreground(sc.rgb, found, None)
            row["colour_local"] = (edge_colour(found, local.onto(sc.rgb.copy()), sc.alpha,
                                               sc.colour)[0] if local is not None else raw)
            del local
            if not args.quick:
                import pymatting

                y0, y1, x0, x1 = subject_box(sc.alpha)
                img = sc.rgb[y0:y1, x0:x1].astype(np.float64) / 255
                fg = pymatting.estimate_foreground_ml(img, found[y0:y1, x0:x1] / 255.0)
                out = sc.rgb.astype(np.float32) / 255
                out[y0:y1, x0:x1] = fg
                row["colour_ml"] = edge_colour(found, out, sc.alpha, sc.colour,
                                               (y0, y1, x0, x1))[0]
                del out, fg, img
            rows.append(row)
            log(f"{sc.name}: " + " ".join(f"{k} {row[f'edges_{k}']:.2f}->{row[f'detail_{k}']:.2f}"
                                         for k in ds.STRUCTURES)
                + f" shadow {row['shadow']} specks {row['specks']:.4f} colour raw "
                  f"{np.mean(list(raw.values())):.1f} despill "
                  f"{np.mean(list(row['colour_despill'].values())):.1f}")
            del sc, edges, found, patch
    return rows


def soft_disc(seed: int):
    """A red disc whose alpha is a sigma 12 px ramp (defocus), on a grey sweep, 24 MP."""
    import cv2

    w, h = SIZE_24MP
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (w // 2, h // 2), 1200, 255, -1)
    alpha = cv2.GaussianBlur(disc.astype(np.float32) / 255, (0, 0), 12)
    rng = np.random.default_rng(seed)
    sweep = np.linspace(0.62, 0.7, h, dtype=np.float32)[:, None]
    rgb = np.empty((h, w, 3), np.uint8)
    for c, v in enumerate((0.75, 0.2, 0.15)):
        x = alpha * v + (1 - alpha) * sweep + rng.normal(0, 1.2 / 255, (h, w)).astype(np.float32)
        rgb[..., c] = np.clip(np.rint(x * 255), 0, 255)
    return rgb, alpha


def run_guard(engine, args, log):
    """What must not get worse: the groundtruth kinds, the hard outline, the soft disc."""
    rows = []
    for kind in (*gt.KINDS, gt.HARD_EDGE, "soft"):
        if kind == "soft":
            rgb, alpha = soft_disc(args.seed)
        else:
            sc = gt.scene(kind, args.seed, SIZE_24MP)
            rgb, alpha = sc.rgb, sc.alpha
        mask = working_mask(engine, rgb)
        edges = refine(rgb, mask, "edges")
        found = stage(rgb, mask, edges.copy())[0]
        row = {"kind": kind, "mae_edges": float(np.abs(edges / 255 - alpha).mean()),
               "mae_detail": float(np.abs(found / 255 - alpha).mean()),
               "changed": float(np.abs(found.astype(np.int16) - edges).mean())}
        if kind in (gt.HARD_EDGE, "soft"):
            row["band_edges"], row["band_detail"] = band_width(edges, alpha), band_width(found, alpha)
        rows.append(row)
        log(f"guard {kind}: MAE {row['mae_edges']:.5f} -> {row['mae_detail']:.5f}"
            + (f" band {row['band_edges']:.1f} -> {row['band_detail']:.1f}" if "band_edges" in row else ""))
    return rows


def run_photos(engine, log):
    import skimage.data

    rows = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.dstack([arr] * 3)
        rgb = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
        mask = working_mask(engine, rgb)
        edges = refine(rgb, mask, "edges")
        found, patch, bd = stage(rgb, mask, edges.copy())
        colour = 0.0
        if patch is not None:
            colour = float(np.abs(patch.onto(rgb.copy()).astype(np.int16) - rgb).mean())
        rows.append({"photo": name, "size": f"{rgb.shape[1]}x{rgb.shape[0]}",
                     "plain": bool(bd is not None and bd.plain),
                     "alpha": float(np.abs(found.astype(np.int16) - edges).mean()),
                     "colour": colour})
        log(f"photo {name}: alpha change {rows[-1]['alpha']:.4f} colour {colour:.4f} "
            f"plain {rows[-1]['plain']}")
    return rows


def _timed_stage(engine, scenes, repeats):
    """Median seconds per file of refine and of what the stage adds (backdrop, detail,
    despill), interleaved on ``scenes``; with the scenes' masks."""
    base, added, parts = [], [], {"backdrop": [], "detail": [], "despill": []}
    for sc in scenes:
        mask = working_mask(engine, sc.rgb)
        for _ in range(repeats):
            t0 = time.perf_counter()
            alpha = refine(sc.rgb, mask, "edges")
            t1 = time.perf_counter()
            bd = backdrop.fit(sc.rgb, mask)
            t2 = time.perf_counter()
            detail.recover(sc.rgb, mask, alpha, bd)
            t3 = time.perf_counter()
            despill.foreground(sc.rgb, alpha, bd)
            t4 = time.perf_counter()
            base.append(t1 - t0)
            added.append(t4 - t1)
            parts["backdrop"].append(t2 - t1)
            parts["detail"].append(t3 - t2)
            parts["despill"].append(t4 - t3)
    return {"refine": float(np.median(base)), "added": float(np.median(added)),
            "added_max": float(np.max(added)), "n": len(added),
            **{k: float(np.median(v)) for k, v in parts.items()}}


def _traced_peaks(engine, sc):
    """Peak traced allocations of refine and of the stage on one scene."""
    mask = working_mask(engine, sc.rgb)
    alpha = refine(sc.rgb, mask, "edges")
    tracemalloc.start()
    refine(sc.rgb, mask, "edges")
    peak_refine = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    stage(sc.rgb, mask, alpha)
    peak_stage = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"refine": peak_refine, "stage": peak_stage, "photo": sc.rgb.nbytes}


def run_cost(engine, args, log):
    out = {}
    for label, size, repeats in (("24 MP", SIZE_24MP, args.repeats), ("1 MP", SIZE_1MP, 3 * args.repeats)):
        sweeps = [ds.scene(sweep, args.seed, size) for sweep in ("white", "grey", "coloured")]
        out[label] = _timed_stage(engine, sweeps, repeats)
        if label == "24 MP":
            out["memory"] = _traced_peaks(engine, sweeps[0])
        del sweeps
        # the busy control: the stage finds the backdrop busy; despill estimates locally
        busy = [ds.scene("busy", seed, size) for seed in (args.seed, args.seed + 1)]
        out[label + " busy"] = _timed_stage(engine, busy, repeats)
        del busy
        log(f"cost {label}: refine {out[label]['refine']:.3f} s, added {out[label]['added']:.3f} s (median)")
    return out


def _m(rows, key, plain=True):
    vals = [r[key] for r in rows if r["plain"] == plain and r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _min(rows, key):
    return float(np.min([r[key] for r in rows if r["plain"]]))


def write_markdown(path: Path, scenes, guard, photos, cost, args, seconds):
    L = []
    w = L.append
    cmd = " ".join(["PYTHONPATH=. .venv/bin/python bench/detail.py", *sys.argv[1:]])
    w("# Detail and edge colour at camera size\n")
    w(f"Generated by `{cmd}` ({seconds / 60:.0f} min) on {platform.node()}, "
      f"{platform.processor() or platform.machine()}, 2 cores shared with other work: the "
      "times are medians of interleaved repeats. Scenes: bench/detailscenes.py at 6000 x 4000 "
      f"with exact alpha, seeds {args.seed}-{args.seed + args.seeds - 1}; the working mask "
      "is u2netp's, made as the daemon makes it. `edges`: refine alone; `detail`: refine, then "
      "the detail stage (daemon/imaging/detail.py).\n")
    plain = [r for r in scenes if r["plain"]]
    busy = [r for r in scenes if not r["plain"]]
    w("## Recall of the thin structures (plain sweeps)\n")
    w("Alpha-weighted recall on each structure's pixels outside the body, "
      "sum(min(alpha, truth)) / sum(truth): mean over the scenes (worst scene).\n")
    w("| structure | edges | detail | target |")
    w("|---|---:|---:|---|")
    for k, t in TARGETS.items():
        got = _m(scenes, f"detail_{k}")
        w(f"| {k} | {_m(scenes, f'edges_{k}'):.3f} | **{got:.3f}** ({_min(scenes, f'detail_{k}'):.3f}) "
          f"| >= {t}: {'met' if _min(scenes, f'detail_{k}') >= t else 'MISSED'} |")
    w("\nPer scene:\n")
    w("| scene | strap | cord | chain | strands | shadow | specks | seam | MAE edges | MAE detail | MAE outside the structures, edges / detail |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in scenes:
        def f(v):
            return "-" if v is None else f"{v:.4f}"
        w(f"| {r['scene']}{'' if r['plain'] else ' (busy: stage off)'} | "
          + " | ".join(f"{r[f'edges_{k}']:.2f} -> {r[f'detail_{k}']:.2f}" for k in ds.STRUCTURES)
          + f" | {f(r['shadow'])} | {f(r['specks'])} | {f(r['seam'])} | {r['mae_edges']:.5f} | "
            f"{r['mae_detail']:.5f} | {r['mae_out_edges']:.5f} / {r['mae_out_detail']:.5f} |")
    w("\n## What stays out\n")
    w("| what | mean alpha with detail (worst scene) | edges alone | target |")
    w("|---|---:|---:|---|")
    for k in ("shadow", "specks", "seam"):
        vals = [r[k] for r in plain if r[k] is not None]
        w(f"| {k} | {np.mean(vals):.4f} ({np.max(vals):.4f}) | {_m(scenes, f'edges_{k}'):.4f} | "
          f"{'<= 0.02: ' + ('met' if np.max(vals) <= 0.02 else 'MISSED') if k != 'seam' else 'reported'} |")
    w("\n## Edge colour\n")
    w("Output and truth composited over black, white and magenta: mean |difference| (0-255) "
      "on pixels of partial truth where the output's alpha is within 0.1 of it. `photo`: the "
      "photo's own pixels (despill off); `despill`: daemon/imaging/despill.py as shipped (the "
      "sweep's model on a plain backdrop, else the colours around the edge); `around the edge`: "
      "the busy backdrop's method forced on every sweep; "
      "`estimate_foreground_ml`: pymatting's, on the subject's box, same alpha; `true colour`: "
      "the subject's own colour written into the same partial pixels, the floor that the "
      "output's alpha error (up to 0.1 on the pixels scored) leaves. Target <= 6.\n")
    w("| sweep | pixels | photo (k/w/m) | despill (k/w/m) | around the edge (k/w/m) | estimate_foreground_ml (k/w/m) | true colour (k/w/m) |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for sweep in ds.SWEEPS:
        rs = [r for r in scenes if r["sweep"] == sweep]

        def fmt(key):
            if any(key not in r for r in rs):
                return "-"
            vals = {b: np.mean([r[key][b] for r in rs]) for b in BACKGROUNDS}
            return f"**{np.mean(list(vals.values())):.1f}** ({' / '.join(f'{v:.1f}' for v in vals.values())})"
        w(f"| {sweep} | {int(np.mean([r['colour_n'] for r in rs]))} | {fmt('colour_raw')} | "
          f"{fmt('colour_despill')} | {fmt('colour_local')} | {fmt('colour_ml')} | "
          f"{fmt('colour_truth')} |")
    w("\nOn the busy control the backdrop model is not what is behind the edge: there despill "
      "estimates the subject's and the background's colours around the edge instead "
      "(alpha-weighted box means on the photo reduced to 512 px, daemon/imaging/surround.py) "
      "and writes the pair nearest them that explains each pixel. Its alpha is the model's "
      "(the stage is off there), far from the truth: the pixels scored are those where it "
      "happens to be within 0.1, and even the true colour leaves the `true colour` column's "
      "error.\n")
    w("## What must not get worse (24 MP, seed " f"{args.seed})\n")
    w("| kind | MAE edges | MAE detail | change | mean alpha change (0-255) | partial band px per outline px, edges / detail |")
    w("|---|---:|---:|---:|---:|---|")
    for r in guard:
        band = (f"{r['band_edges']:.1f} / **{r['band_detail']:.1f}** "
                f"({'<= 4' if r['kind'] == gt.HARD_EDGE else '>= 10'})") if "band_edges" in r else "-"
        w(f"| {r['kind']} | {r['mae_edges']:.5f} | {r['mae_detail']:.5f} | "
          f"{100 * (r['mae_detail'] / r['mae_edges'] - 1):+.2f}% | {r['changed']:.3f} | {band} |")
    w("\n## Real photos (scikit-image, busy backgrounds)\n")
    w("Mean |alpha with the stage - alpha of `refine: edges`| over the frame (0-255; target "
      "<= 1), and the mean colour change despill makes (0-255, over the frame): it changes "
      "only the partial pixels, with colours estimated around the edge; on the busy "
      "controls, where the truth is known, that brings the composite closer to it (edge "
      "colour table above).\n")
    w("| photo | size | plain backdrop | alpha change | colour change |")
    w("|---|---|---|---:|---:|")
    for r in photos:
        w(f"| {r['photo']} | {r['size']} | {r['plain']} | {r['alpha']:.4f} | {r['colour']:.4f} |")
    w("\n## Cost\n")
    w("Seconds per file, median over the white, grey and coloured scenes and the repeats "
      "(`busy` rows: the two busy controls, where the stage only fits the backdrop and "
      "despill estimates locally), refine and the stage interleaved (targets: added <= "
      "1.0 s at 24 MP, <= 60 ms at 1 MP).\n")
    w("| size | refine alone | added: backdrop + detail + despill | backdrop | detail | despill | worst added | runs |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in ("24 MP", "1 MP", "24 MP busy", "1 MP busy"):
        if label not in cost:
            continue
        c = cost[label]
        w(f"| {label} | {c['refine']:.3f} | **{c['added']:.3f}** | {c['backdrop']:.3f} | "
          f"{c['detail']:.3f} | {c['despill']:.3f} | {c['added_max']:.3f} | {c['n']} |")
    m = cost.get("memory")
    if m:
        w(f"\nPeak of traced allocations (tracemalloc, numpy included) at 24 MP: refine "
          f"{m['refine'] / 2**20:.0f} MB, the stage {m['stage'] / 2**20:.0f} MB, against the "
          f"decoded photo's {m['photo'] / 2**20:.0f} MB. Despill writes its colours into the "
          "copy the renderer makes anyway (the PNG strips, the cutout): no copy of the photo.")
    if busy:
        w(f"\nBusy control: the backdrop is found not plain in {sum(not r['plain'] for r in busy)}"
          f" of {len(busy)} scenes, and the stage leaves them as refine makes them.")
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="no pymatting baseline")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "detail.md")
    p.add_argument("--work", type=Path, help="keep each section's results here and reuse them")
    args = p.parse_args(argv)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    engine = Engines(args.models_dir, threads=2).mask("u2netp")

    def section(name, fn, *a):
        import pickle

        kept = args.work / f"{name}.pkl" if args.work else None
        if kept is not None and kept.exists():
            return pickle.loads(kept.read_bytes())
        result = fn(engine, *a)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_bytes(pickle.dumps(result))
        return result

    scenes = section("scenes", run_detail_scenes, args, log)
    guard = section("guard", run_guard, args, log)
    photos = section("photos", run_photos, log)
    cost = section("cost", run_cost, args, log)
    write_markdown(args.out, scenes, guard, photos, cost, args, time.perf_counter() - start)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
