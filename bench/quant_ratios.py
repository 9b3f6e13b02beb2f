"""`rembg p` against `rembgd process` with u2netp and u2netp-int8, side by side, in one run.

    .venv/bin/python bench/quant_ratios.py [--rounds 2] [--only distinct1,studio,distinct24]
        [--baseline DIR]

Issue 27's speed targets. Three workloads, each a folder made once under
bench/out/quant/src/ (reused by later runs):

- ``distinct1``: 21 distinct 1344x896 (1.2 MP) JPEGs (``workloads.composite``, seeds 7000-7020);
- ``studio``: a 32-file studio mix (``workloads.studio(32, 6)``: 6 originals, 18 exact
  copies / re-encodes / resizes of them, 8 one-offs);
- ``distinct24``: 3 distinct 6000x4000 (24 MP) camera JPEGs (``camera.camera_jpeg``).

Per round and workload the three commands run in a rotating order (rembg p, rembgd
u2netp, rembgd u2netp-int8), each cold (start-up included), 2 ONNX threads, rembgd with
a fresh cache and the default ``refine: edges``; wall time and the process tree's peak
RSS (psutil) per run. The ratios are rembg's wall over rembgd's, median over rounds.
Both tools read var/models (rembg through ``U2NET_HOME``, with downloads blocked).

Byte code: rembg's site-packages hold pip's ``.pyc`` files, while ``daemon/`` is an
editable install and the shell sets PYTHONDONTWRITEBYTECODE, so every rembgd start
would compile ``daemon/`` from source (~70 ms). As a regular ``pip install`` would,
``compileall`` writes daemon's byte code once before the runs (and the baseline's).

``--baseline DIR``: also run ``rembgd u2netp-int8`` from another checkout's ``daemon/``
(e.g. ``git archive BASE | tar -x -C DIR``), in the same rotation: before and after,
side by side. ``--baseline-models DIR``: the baseline reads its models from DIR (e.g. a
u2netp-int8 quantised with BASE's recipe) instead of var/models.

``--floor``: also run ``rembgd u2netp-int8`` with ``refine: none``, ``detail: false`` and
``despill: false`` (the plain upscaled mask, as rembg cuts): what rembgd's cache and
pipeline cost without the stages rembg does not have, i.e. the most the int8 model can
give against rembg on that workload.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import camera  # noqa: E402
import workloads as wl  # noqa: E402

OUT = BENCH / "out" / "quant"
TOOLS = ("rembg p", "rembgd u2netp", "rembgd u2netp-int8")
TARGETS = {"distinct1": 2.0, "studio": 5.0, "distinct24": 4.0}  # int8 vs rembg p, issue 27


def _distinct1() -> dict:
    return {f"d{i:02d}.jpg": (lambda i=i: wl.encode_jpeg(wl.composite(7000 + i, (1344, 896))))
            for i in range(21)}


def _studio() -> dict:
    return {it.name: (lambda it=it: it.data) for it in wl.studio(32, originals=6).items}


def _distinct24() -> dict:
    return {f"c{i}.jpg": (lambda i=i: camera.camera_jpeg(8000 + i, (6000, 4000)))
            for i in range(3)}


WORKLOADS = {"distinct1": _distinct1, "studio": _studio, "distinct24": _distinct24}


def folder(name: str) -> Path:
    camera.OUT = OUT  # camera.folder caches under camera.OUT / "src"
    return camera.folder(name, WORKLOADS[name]())


BASELINE = "rembgd u2netp-int8 baseline"
FLOOR = "rembgd u2netp-int8 floor"
PLAIN = {"output": {"refine": "none", "detail": False, "despill": False}}  # --floor's config


def compile_daemon(root: Path) -> None:
    """Byte-compile ``root``/daemon, as ``pip install`` does for a package (see above)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "daemon")], check=True)


def run(tool: str, src: Path, work: Path, baseline: Path | None = None,
        baseline_models: Path | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if tool == "rembg p":
        return camera.rembg_p(src, work / "out")
    cfg = camera.config(work, baseline_models if tool == BASELINE else None,
                        **(PLAIN if tool == FLOOR else {}))
    model = tool.split()[1]
    # the baseline's daemon package first on the path (``-m`` would put the cwd first)
    start = ["-c", f"import sys; sys.path.insert(0, {str(baseline)!r}); from daemon.cli "
                   "import main; sys.exit(main())"] if tool == BASELINE else ["-m", "daemon"]
    return camera.timed([sys.executable, *start, "-c", str(cfg), "process", str(src),
                         "-o", str(work / "out"), "-m", model], work / "out")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--out", type=Path, default=BENCH / "quant_ratios.md")
    ap.add_argument("--baseline", type=Path,
                    help="another checkout whose daemon/ runs as a fourth tool (int8)")
    ap.add_argument("--baseline-models", type=Path,
                    help="the baseline's models dir (default: var/models)")
    ap.add_argument("--floor", action="store_true",
                    help="also int8 with refine: none, detail and despill off")
    args = ap.parse_args()
    names = args.only.split(",")
    srcs = {n: folder(n) for n in names}
    tools = TOOLS + ((BASELINE,) if args.baseline else ()) + ((FLOOR,) if args.floor else ())
    for root in (BENCH.parent, args.baseline):
        if root is not None:
            compile_daemon(root)
    camera.warm_up_rembg(srcs[names[0]])
    started, load0 = time.time(), os.getloadavg()[0]
    runs: dict = {n: {t: [] for t in tools} for n in names}
    for r in range(args.rounds):
        for k, name in enumerate(names):
            turn = (r + k) % len(tools)
            for tool in tools[turn:] + tools[:turn]:
                res = run(tool, srcs[name], OUT / "runs" / name / tool.replace(" ", "_"),
                          args.baseline, args.baseline_models)
                runs[name][tool].append({"wall_s": res["wall_s"], "peak_rss": res["peak_rss"]})
                camera.log(f"round {r + 1} {name} {tool}: {res['wall_s']:.1f} s, "
                           f"peak RSS {res['peak_rss'] / 2**20:.0f} MB")
    (OUT / "ratios.json").write_text(json.dumps(runs, indent=1))
    lines = ["# `rembg p` against `rembgd process` (u2netp, u2netp-int8): bench/quant_ratios.py",
             "", f"`bench/quant_ratios.py --rounds {args.rounds} --only {args.only}`, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, 2 ONNX threads, load average "
             f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (a shared "
             f"machine: ratios, not absolute times); run took {time.time() - started:.0f} s. "
             "Wall: median over rounds (each round in a rotated order); RSS: max. rembgd's "
             "byte code compiled before the runs (compileall, as `pip install` would)."
             + (f" Baseline: int8 from `{args.baseline}`"
                + (f" with the models in `{args.baseline_models}`" if args.baseline_models else "")
                + ", in the same rotation." if args.baseline else "")
             + (" Floor: int8 with `refine: none`, `detail: false`, `despill: false`, in the "
                "same rotation." if args.floor else ""), "",
             "| workload | files | `rembg p` s | u2netp s | u2netp-int8 s | ratio u2netp | "
             "ratio int8 (target) | peak RSS MB rembg / u2netp / int8 |"
             + (" int8 baseline s | ratio int8 baseline |" if args.baseline else "")
             + (" int8 floor s | ratio int8 floor |" if args.floor else ""),
             "|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if args.baseline else "")
             + ("---:|---:|" if args.floor else "")]
    for name in names:
        med = {t: statistics.median(x["wall_s"] for x in runs[name][t]) for t in tools}
        rss = {t: max(x["peak_rss"] for x in runs[name][t]) / 2**20 for t in tools}
        n = sum(1 for p in srcs[name].iterdir() if not p.name.startswith("."))
        lines.append(
            f"| {name} | {n} | {med['rembg p']:.1f} | {med['rembgd u2netp']:.1f} | "
            f"{med['rembgd u2netp-int8']:.1f} | {med['rembg p'] / med['rembgd u2netp']:.2f}x | "
            f"{med['rembg p'] / med['rembgd u2netp-int8']:.2f}x (>= {TARGETS[name]}x) | "
            f"{rss['rembg p']:.0f} / {rss['rembgd u2netp']:.0f} / "
            f"{rss['rembgd u2netp-int8']:.0f} |"
            + (f" {med[BASELINE]:.1f} | {med['rembg p'] / med[BASELINE]:.2f}x |"
               if args.baseline else "")
            + (f" {med[FLOOR]:.1f} | {med['rembg p'] / med[FLOOR]:.2f}x |" if args.floor else ""))
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
