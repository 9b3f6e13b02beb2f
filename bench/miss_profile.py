"""Where a distinct 1.2 MP miss spends its time in `rembgd process` (cProfile, every worker).

    .venv/bin/python bench/miss_profile.py [--n 12] [--model u2netp] [--threads 2] [--top 25]
    .venv/bin/python bench/miss_profile.py --src bench/out/quant/src/distinct24 --cpu

Makes ``--n`` distinct studio composites (bench/workloads.py, 1344x896 JPEG), runs
`rembgd process` on them in this process with a fresh cache, and profiles each
``Pipeline.render`` call in the worker thread that runs it (cProfile profiles one
thread), then merges the profiles (``--src``: the files of that folder instead, e.g. the
distinct 24 MP set of bench/quant_ratios.py). Prints the stages' cumulative seconds per file
(decode, fingerprints, embedder, model, refine, confidence, encode, cache writes)
and the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import workloads as wlmod  # noqa: E402

STAGES = {  # label: (file suffix, function name) as pstats keys them
    "render (one file, all stages)": ("daemon/pipeline.py", "render"),
    "decode": ("daemon/imaging/decode.py", "decode"),
    "fingerprint": ("daemon/imaging/fingerprint.py", "fingerprint"),
    "embedder": ("daemon/inference/engine.py", "embed"),
    "model (predict_mask)": ("daemon/imaging/render.py", "predict_mask"),
    "ORT run (mask + embedder)": ("~", "<built-in method onnxruntime.capi.onnxruntime_pybind11_state.run>"),
    "mask model normalize": ("daemon/inference/engine.py", "normalize"),
    "mask back to working size (fit_mask)": ("daemon/imaging/render.py", "fit_mask"),
    "pixel hash": ("daemon/imaging/fingerprint.py", "pixel_hash"),
    "full-size alpha (Matte.alpha)": ("daemon/imaging/matte.py", "alpha"),
    "refine": ("daemon/imaging/refine.py", "refine"),
    "PNG encode (encode_png)": ("daemon/imaging/png.py", "encode_png"),
    "confidence": ("daemon/imaging/confidence.py", "score"),
    "render_target (encode)": ("daemon/imaging/render.py", "render_target"),
    "cache put_mask": ("daemon/cache/mask_cache.py", "put_mask"),
    "cache commit (output rows)": ("daemon/cache/mask_cache.py", "commit"),
    "stamp_files": ("daemon/imaging/render.py", "stamp_files"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--model", default="u2netp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--src", type=Path, help="profile this folder's files instead of --n composites")
    ap.add_argument("--cpu", action="store_true",
                    help="this thread's CPU seconds instead of wall (a loaded machine; ORT's "
                         "own pool thread is then not counted)")
    args = ap.parse_args()

    from daemon.cli import main as cli_main
    from daemon.pipeline import Pipeline

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = Pipeline.render

    def profiled(self, *a, **kw):
        prof = cProfile.Profile(time.thread_time if args.cpu else time.perf_counter)
        prof.enable()
        try:
            return original(self, *a, **kw)
        finally:
            prof.disable()
            with lock:
                profiles.append(prof)

    Pipeline.render = profiled
    with tempfile.TemporaryDirectory(prefix="miss-profile-") as tmp:
        tmp = Path(tmp)
        inbox, outbox = args.src or tmp / "in", tmp / "out"
        if args.src is None:
            inbox.mkdir()
        for i in range(0 if args.src else args.n):
            rgb = wlmod.composite(5000 + i, (1344, 896))
            (inbox / f"d{i:03d}.jpg").write_bytes(wlmod.encode_jpeg(rgb))
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "watch": [{"inbox": str(inbox), "outbox": str(outbox)}],
            "models": {"dir": str(args.models_dir)}, "cache": {"dir": str(tmp / "cache")},
            "threads": args.threads, "output": {"model": args.model}}))
        start = time.perf_counter()
        rc = cli_main(["-c", str(cfg), "process", str(inbox), "-o", str(outbox)])
        wall = time.perf_counter() - start
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    n = len(profiles)
    print(f"rc {rc}; {n} files; wall {wall:.2f} s for the whole command ({wall / max(n, 1):.3f} s/file)")
    print(f"\nstage cumulative {'thread CPU' if args.cpu else 'wall'} seconds per file "
          f"(model {args.model}, {args.threads} ORT threads):")
    for label, (suffix, fn) in STAGES.items():
        total = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(suffix) and k[2] == fn)
        print(f"  {label:34s} {total / n:.4f}")
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
