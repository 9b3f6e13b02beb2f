#!/usr/bin/env python3
"""Camera-size files (24-100 MP): `rembgd process` against `rembg p`, side by side, one run.

    .venv/bin/python bench/camera.py            # full: bench/camera.md + bench/camera.png
    .venv/bin/python bench/camera.py --quick    # smaller counts (development, ~4 min)
    .venv/bin/python bench/camera.py --refine-only --quick  # only the refinement cost

The refinement cost (``refine: edges``, daemon/imaging/refine.py) is measured twice:
inside one process, refinement against today's Pillow upscale and ``refine: none`` on the
same decoded files and masks, alternating; and as whole `rembgd process` runs with
``refine: edges`` and ``none`` beside `rembg p` over the distinct 24 MP folder.
``--refine-only`` runs just that and replaces its section of camera.md. ``--distinct24 N``
runs only `rembg p` against `rembgd process` (defaults: refine, detail and despill on)
over N distinct 24 MP files, twice in alternating order, and prints the wall ratio and
both peaks of RSS (bench/out/camera/distinct24.json). ``REMBG_CLI``
names another `rembg` executable (one whose venv has rembg's CLI extras).

Both tools run as cold commands over a folder, as users run them, with the same
model (u2netp) and 2 ONNX Runtime threads (`threads: 2`, `OMP_NUM_THREADS=2`);
one pass of each tool per workload, back to back, the order alternating from one
workload to the next, so that drifting background load weighs on both. rembg is offline
(`U2NET_HOME` = the provisioned models, proxies to a closed port).

Workloads (photos from the scikit-image wheel, composited on a backdrop,
upscaled to camera size with sensor-like grain, JPEG q90 with an sRGB ICC
profile and EXIF):

- distinct 24 MP: 10 different 6000x4000 JPEGs (also the RSS soak);
- distinct 50-100 MP: 2 files (8500x6000, 12000x8000);
- studio mix 24 MP: 60% repeats (exact copies and q85 re-encodes) of 4 originals;
- distinct 1 MP: 21 files of 1200x900;
- near hit, drop to output: a warm `rembgd run`, the original dropped once, then
  re-encodes of it (distinct bytes and pixels: near hits), one at a time, at 1 MP
  and 24 MP; median;
- all-hit folder: `rembgd process` over 20 files it has already processed;
- peak RSS (psutil, sampled every 0.05 s) of a 24 MP and a 100 MP miss, and the
  RSS after every file of the distinct 24 MP run (the soak).

Scratch data in bench/out/camera/ (gitignored); results in bench/camera.md and
bench/camera.png, overwritten on every run; raw numbers in bench/out/camera/results.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import workloads as wl  # noqa: E402
from measure import Daemon, OutputRecorder, drop_rename, now  # noqa: E402
from common import Sampler, write_config  # noqa: E402

OUT = BENCH / "out" / "camera"
THREADS = 2
TARGETS = {  # measure -> (target, "min": value >= target | "max": value <= target)
    "distinct_24": (2.5, "min"), "distinct_1": (1.2, "min"), "studio_24": (4.0, "min"),
    "near_1_ms": (80.0, "max"), "near_24_ms": (700.0, "max"), "all_hit_s": (1.0, "max"),
}
PROFILES = {
    "full": dict(d24=10, big=((8500, 6000), (12000, 8000)), studio=10, originals=4, d1=21,
                 near=7, hits=20, rss100=(10000, 10000)),
    "quick": dict(d24=3, big=((8500, 6000),), studio=5, originals=2, d1=6,
                  near=3, hits=20, rss100=(8000, 6000)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ images


def camera_jpeg(seed: int, size: tuple[int, int], quality: int = 90) -> bytes:
    """A studio-style composite at 1/3 size, upscaled, with grain (sigma 4): ~0.19 B/px at q90."""
    from daemon.imaging.colour import srgb_profile

    w, h = size
    base = wl.composite(seed, (max(64, w // 3), max(64, h // 3)))
    arr = np.asarray(Image.fromarray(base).resize(size, Image.Resampling.BICUBIC), np.int16)
    noise = np.random.default_rng(seed).normal(0, 4.0, (h, w, 1)).astype(np.int16)
    arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "rembgd bench", "camera.py", 1
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, icc_profile=srgb_profile(),
                              exif=exif.tobytes())
    return buf.getvalue()


def reencode(data: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.save(buf, "JPEG", quality=quality, icc_profile=img.info.get("icc_profile"))
    return buf.getvalue()


def folder(name: str, files: dict[str, callable]) -> Path:
    """bench/out/camera/src/<name>/ with ``files`` (name -> maker), made once and reused."""
    d = OUT / "src" / name
    stamp = d / ".complete"
    if stamp.exists() and stamp.read_text() == ",".join(sorted(files)):
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for fname, make in files.items():
        (d / fname).write_bytes(make())
    stamp.write_text(",".join(sorted(files)))
    return d


def studio_files(n: int, originals: int) -> dict[str, callable]:
    """``originals`` new files and 60% repeats: exact copies and q85/q80 re-encodes."""
    cache: dict[int, bytes] = {}

    def orig(i: int) -> bytes:
        if i not in cache:
            cache[i] = camera_jpeg(5000 + i, (6000, 4000))
        return cache[i]

    files: dict[str, callable] = {}
    unique = n - round(0.6 * n)
    for i in range(unique):
        files[f"s{i:02d}_original.jpg"] = (lambda i=i: orig(i % originals)) if i < originals \
            else (lambda i=i: camera_jpeg(6000 + i, (6000, 4000)))
    for j in range(n - unique):
        i, kind = j % originals, ("exact", "q85", "q80")[j % 3]
        files[f"s{unique + j:02d}_{kind}_of_{i}.jpg"] = (
            (lambda i=i: orig(i)) if kind == "exact" else
            (lambda i=i, q=int(kind[1:]): reencode(orig(i), q)))
    return files


# ------------------------------------------------------------------ running


def env() -> dict:
    return {**os.environ, "U2NET_HOME": str(ROOT / "var" / "models"),
            "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def config(d: Path, models: Path | None = None, **extra) -> Path:
    extra = {"threads": THREADS, "logging": {"level": "warning"}, **extra}
    return write_config(d, models or ROOT / "var" / "models", **extra)


def timed(cmd: list[str], outdir: Path, track: bool = False) -> dict:
    """Run a cold command to completion: wall, peak RSS, stdout; per-output times if ``track``."""
    outdir.mkdir(parents=True, exist_ok=True)
    rec = OutputRecorder(outdir) if track else None
    t0 = now()
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    out, err = proc.communicate()
    wall = now() - t0
    sampler.finish()
    if rec is not None:
        rec.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    res = dict(wall_s=wall, peak_rss=sampler.peak, stdout=out.strip().splitlines()[-1:] or [""])
    if rec is not None:
        res["outputs"] = {n: t - t0 for n, t in rec.times.items()}
        res["rss_series"] = [(t - t0, r) for t, r in sampler.series]
    return res


def rembg_p(src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    rembg = os.environ.get("REMBG_CLI") or str(Path(sys.executable).with_name("rembg"))
    return timed([rembg, "p", "-m", "u2netp", str(src),
                  str(out)], out)


def warm_up_rembg(src: Path) -> None:
    """One untimed `rembg i`: a fresh install compiles pymatting's numba kernels into
    its on-disk cache on first use (~60 s here), a one-off that is not rembg's speed."""
    first = next(p for p in sorted(src.iterdir()) if not p.name.startswith("."))
    out = OUT / "runs" / "rembg_warm_up.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    rembg = os.environ.get("REMBG_CLI") or str(Path(sys.executable).with_name("rembg"))
    t = now()
    subprocess.run([rembg, "i", "-m", "u2netp", str(first), str(out)], env=env(), cwd=ROOT,
                   check=True, capture_output=True)
    log(f"rembg warm-up (untimed in the tables): {now() - t:.1f} s")


def rembgd_process(cfg: Path, src: Path, out: Path, track: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return timed([sys.executable, "-m", "daemon", "-c", str(cfg), "process", str(src),
                  "-o", str(out)], out, track)


def compare(name: str, src: Path, order: int) -> dict:
    """rembg p and rembgd process (fresh cache) over ``src``, in alternating order."""
    d = OUT / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    cfg = config(d)
    runs = {}
    steps = [("rembg p", lambda: rembg_p(src, d / "rembg_out")),
             ("rembgd process", lambda: rembgd_process(cfg, src, d / "rembgd_out", track=True))]
    for label, fn in (steps if order % 2 == 0 else steps[::-1]):
        log(f"{name}: {label} ...")
        runs[label] = fn()
        log(f"{name}: {label} {runs[label]['wall_s']:.1f} s, peak RSS "
            f"{runs[label]['peak_rss'] / 2**20:.0f} MB {runs[label]['stdout']}")
    n = sum(1 for p in src.iterdir() if not p.name.startswith("."))
    mp = float(np.mean([_mp(p) for p in src.iterdir() if not p.name.startswith(".")]))
    return dict(files=n, mp=mp, runs=runs, cfg=str(cfg),
                ratio=runs["rembg p"]["wall_s"] / runs["rembgd process"]["wall_s"])


def _mp(path: Path) -> float:
    with Image.open(path) as img:
        return img.size[0] * img.size[1] / 1e6


def near_hits(name: str, original: bytes, n: int) -> dict:
    """Drop-to-output of near hits in a warm `rembgd run` (one file at a time)."""
    d = OUT / "runs" / f"near_{name}"
    shutil.rmtree(d, ignore_errors=True)
    cfg = config(d, settle_s=0.3, poll_interval_s=0.2,
                 logging={"level": "info", "format": "json"})
    daemon = Daemon(cfg, d / "rembgd.log", env()).start()
    rec = OutputRecorder(d / "outbox")
    try:
        def drop(fname: str, data: bytes, timeout: float = 120) -> tuple[float, str]:
            t = drop_rename(d / "inbox", fname, data)
            if not rec.wait({fname + ".png"}, timeout, alive=lambda: daemon.proc.poll() is None):
                raise RuntimeError(f"no output for {fname}; see {d / 'rembgd.log'}")
            got = daemon.wait_event(lambda e: e.get("event") == "processed"
                                    and Path(e.get("path", "")).name == fname, 10)
            return (rec.times[fname + ".png"] - t) * 1000, got[-1].get("outcome")

        miss_ms, tier = drop("original.jpg", original)
        lat, tiers = [], []
        for k in range(n):
            ms, tier = drop(f"near{k}.jpg", reencode(original, 88 - 2 * k))
            lat.append(ms)
            tiers.append(tier)
        return dict(miss_ms=miss_ms, near_ms=lat, tiers=tiers, median_ms=statistics.median(lat))
    finally:
        rec.stop()
        daemon.stop()


def all_hits(cfg: Path, src: Path, n: int) -> dict:
    """`rembgd process` over ``n`` files already in the cache (cold command, in all)."""
    d = OUT / "runs" / "all_hit"
    shutil.rmtree(d, ignore_errors=True)
    (d / "src").mkdir(parents=True)
    for p in sorted(q for q in src.iterdir() if not q.name.startswith("."))[:n]:
        shutil.copyfile(p, d / "src" / p.name)
    walls = []
    for _ in range(3):
        r = rembgd_process(cfg, d / "src", d / "out")
        walls.append(r["wall_s"])
    return dict(files=n, walls_s=walls, median_s=statistics.median(walls), stdout=r["stdout"])


def single_rss(name: str, data: bytes) -> dict:
    d = OUT / "runs" / f"rss_{name}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "src").mkdir(parents=True)
    (d / "src" / "one.jpg").write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        mp = img.size[0] * img.size[1] / 1e6
    r = rembgd_process(config(d), d / "src", d / "out")
    return dict(mp=mp, peak_rss=r["peak_rss"], wall_s=r["wall_s"],
                mb_per_mp=r["peak_rss"] / 2**20 / mp)


def soak(run: dict) -> dict:
    """RSS right after each output of a distinct run (files in completion order)."""
    outs = sorted(run["outputs"].values())
    series = run["rss_series"]
    after = []
    for t in outs:
        window = [r for ts, r in series if t - 0.05 <= ts <= t + 0.3]
        after.append(max(window) if window else None)
    vals = [a for a in after if a]
    half = len(vals) // 2
    growth = (max(vals[half:]) / max(vals[1:half] or vals[:1]) - 1) if len(vals) >= 4 else None
    return dict(rss_after_mb=[round(a / 2**20) if a else None for a in after],
                peak_mb=run["peak_rss"] / 2**20, growth=growth)


# ------------------------------------------------------------------ report


def verdict(key: str, value: float | None) -> str:
    target, kind = TARGETS[key]
    if value is None:
        return "not measured"
    ok = value >= target if kind == "min" else value <= target
    if ok:
        return "**met**"
    miss = (target / value if kind == "min" else value / target)
    return f"**not met** (by {miss:.2f}x)"


# Where a near hit's time goes: measured by hand (cProfile of Pipeline.render in one process,
# a warm pipeline over a SQLite cache, u2netp, 2 threads), not by this script. Update with it.
NEAR_PROFILE = """\
## Where a near hit's time goes (profile, measured separately)

A 24 MP near hit renders in 0.52-0.57 s inside `Pipeline.render` (warm, one process, quiet
machine; 0.74-1.1 s in later runs while other jobs shared the 2 cores);
the daemon reports 0.72-0.84 s for the whole job (`"ms"` in its `processed` events), the rest
being the job's own read, the 29 MB atomic write with fsync (~90 ms measured alone), the
ledger and disposal, and sharing 2 cores with the watcher thread.

| step (24 MP near hit) | ms | owner |
|---|---:|---|
| JPEG decode (libjpeg-turbo, one thread) | 80 | `imaging/decode.py` |
| `ImageOps.exif_transpose` copy (orientation 1: a 72 MB copy for nothing) | 40 | `imaging/decode.py` |
| `np.asarray(PIL image)` (`tobytes`, another 72 MB copy) | 30-58 | `imaging/decode.py` |
| exact pixel hash (SHA-256 of 72 MB) | 39 | `imaging/fingerprint.py` |
| working copy, pHash, embedding, mask lookup | ~40 | fingerprint, pipeline |
| working mask -> full size (BILINEAR; LANCZOS was ~110) | 63 | `imaging/render.py` |
| PNG, level 1, 2 threads (the single-stream writer was ~330-430) | 160-230 | `imaging/png.py` |
| stored output for the next exact copy (SHA-256 + blob write + fsync) | ~40 | cache |

At 1 MP the render is 57-60 ms and the job ~80 ms, so the < 80 ms target sits within the noise of
the job's write, ledger and watcher wake-up. A rerun of the near-hit measure alone on a quieter
machine (08:31, load 0.9) gave 82 ms at 1 MP and 777 ms at 24 MP (medians of 7).

Reproduce the profile: `.venv/bin/python bench/camera.py --profile-near 24` (or `1`).
"""


def profile_near(mp: str) -> None:
    """cProfile of one near hit in `Pipeline.render` (warm, in this process), printed."""
    import cProfile
    import pstats
    import tempfile

    from tests.helpers import pipeline_over  # noqa: E402

    from daemon import config as configmod, runtime
    from daemon.cache import open_store
    from daemon.imaging.decode import DEFAULT_MAX_PIXELS
    from daemon.inference.engine import Engines
    from daemon.pipeline import Plan

    runtime.configure_imaging(DEFAULT_MAX_PIXELS)
    tmp = Path(tempfile.mkdtemp(dir=OUT))
    try:
        cfg = configmod.load(write_config(tmp, ROOT / "var" / "models", threads=THREADS))
        pipe = pipeline_over(cfg, Engines(cfg.models_dir, THREADS), open_store(cfg.store, cfg.cache))
        original = camera_jpeg(424, (6000, 4000) if mp == "24" else (1200, 900))
        variants = [reencode(original, 88 - 2 * k) for k in range(6)]
        plan = Plan(cfg.output)
        log(f"first: {pipe.render(original, plan).tier}; warm-up: {pipe.render(variants[0], plan).tier}")
        times = []
        for v in variants[1:5]:
            t = time.perf_counter()
            assert pipe.render(v, plan).tier == "near"
            times.append(round((time.perf_counter() - t) * 1000))
        log(f"near hits at {mp} MP, Pipeline.render: {times} ms")
        prof = cProfile.Profile()
        prof.runcall(pipe.render, variants[5], plan)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ refinement cost

REFINE_REPEATS = 3
REFINE_HEADING = "## Refinement cost (`refine: edges`)"


def _images(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if not p.name.startswith("."))


def refine_in_process(src: Path) -> dict:
    """Seconds per file to make the full-size mask: today's Pillow upscale, `none`, `edges`."""
    from daemon.config import OutputOptions
    from daemon.imaging import fingerprint as fpmod
    from daemon.imaging.decode import decode
    from daemon.imaging.refine import refine
    from daemon.imaging.render import predict_mask
    from daemon.inference.engine import Engines

    engine = Engines(ROOT / "var" / "models", threads=THREADS).mask("u2netp")
    steps = {"pillow": lambda rgb, m: np.asarray(Image.fromarray(m).resize(
                 (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR)),
             "none": lambda rgb, m: refine(rgb, m, "none"),
             "edges": lambda rgb, m: refine(rgb, m, "edges")}
    times = {k: [] for k in steps}
    for path in _images(src):
        rgb = decode(path.read_bytes()).rgb
        small = np.asarray(fpmod.working_copy(Image.fromarray(rgb)))
        mask = predict_mask(engine, small, OutputOptions(), (rgb.shape[1], rgb.shape[0]))
        for _ in range(REFINE_REPEATS):
            for name, fn in steps.items():
                t0 = time.process_time(), now()
                fn(rgb, mask)
                times[name].append((now() - t0[1], time.process_time() - t0[0]))
    return {k: {"wall": [w for w, _ in v], "cpu": [c for _, c in v]} for k, v in times.items()}


def refine_processes(src: Path) -> dict:
    """`rembg p`, then `rembgd process` with refine edges and none, twice each, alternating."""
    runs = {"rembg p": [], "edges": [], "none": []}
    log("refine: rembg p ...")
    runs["rembg p"].append(rembg_p(src, OUT / "runs" / "refine_rembg")["wall_s"])
    for mode in ("edges", "none", "none", "edges"):
        d = OUT / "runs" / f"refine_{mode}"
        shutil.rmtree(d, ignore_errors=True)  # a fresh cache: every file a miss
        log(f"refine: rembgd process, refine {mode} ...")
        runs[mode].append(rembgd_process(config(d, output={"refine": mode}), src,
                                         d / "out")["wall_s"])
    return runs


def refine_cost(d24: Path, d1: Path) -> dict:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log("refinement cost in process ...")
    res = {"load_start": load, "files_24": len(_images(d24)), "files_1": len(_images(d1)),
           "in_process": {"24": refine_in_process(d24), "1": refine_in_process(d1)}}
    res["processes_24"] = refine_processes(d24)
    res["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return res


def refine_section(r: dict) -> list[str]:
    def ms(xs):
        return f"{min(xs) * 1000:.0f} | {statistics.median(xs) * 1000:.0f}"

    lines = [REFINE_HEADING, "",
             f"Load (`uptime`) at the start {r['load_start']}, at the end {r['load_end']} on "
             f"{os.cpu_count()} cores, shared with other jobs: wall times carry their work, so "
             "the paired differences and CPU times are the figures. In process: decode, the "
             "daemon's working mask (u2netp), then each way of making the full-size mask, "
             f"alternating, {REFINE_REPEATS} times per file; ms.", "",
             "| size | files | full-size mask | wall best | wall median | CPU best | CPU median |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for mp, n in (("24", r["files_24"]), ("1", r["files_1"])):
        t = r["in_process"][mp]
        added = {k: [e - p for e, p in zip(t["edges"][k], t["pillow"][k])] for k in ("wall", "cpu")}
        for label, step in (("today: Pillow BILINEAR upscale", t["pillow"]),
                            ("`refine: none` (OpenCV bilinear)", t["none"]),
                            ("`refine: edges`", t["edges"]),
                            ("**added by `edges`** (paired, vs today)", added)):
            lines.append(f"| {mp} MP | {n} | {label} | {ms(step['wall'])} | {ms(step['cpu'])} |")
    p = r["processes_24"]
    rembg, edges, none = min(p["rembg p"]), min(p["edges"]), min(p["none"])
    lines += ["", f"Whole runs over the {r['files_24']} distinct 24 MP files (cold commands, "
              "start-up included, fresh caches; `rembgd process` twice per mode, alternating, "
              f"best): `rembg p` {rembg:.1f} s; `rembgd process` with `refine: edges` "
              f"{edges:.1f} s (**{rembg / edges:.2f}×** rembg; target ≥ 3×), with "
              f"`refine: none` {none:.1f} s ({rembg / none:.2f}×): "
              f"{(edges - none) / r['files_24']:+.2f} s per file (runs: edges "
              f"{', '.join(f'{x:.1f}' for x in p['edges'])} s, none "
              f"{', '.join(f'{x:.1f}' for x in p['none'])} s).", ""]
    return lines


def patch_refine_section(md: Path, section: list[str]) -> None:
    """Replace (or append) the refinement section of an existing camera.md."""
    head, found, rest = (md.read_text() if md.exists() else "").partition(REFINE_HEADING)
    after = rest.find("\n## ") if found else -1
    tail = rest[after:] if after >= 0 else ""
    md.write_text(head.rstrip("\n") + "\n\n" + "\n".join(section) + tail)


def write_report(data: dict, md: Path, png: Path) -> None:
    c = data["compare"]
    near, hits, rss = data["near"], data["all_hit"], data["rss"]
    meta = data["meta"]
    rows = [
        ("distinct 24 MP", "distinct_24", c["distinct_24"]),
        ("distinct 50-100 MP", None, c["distinct_big"]),
        ("studio mix 24 MP (60% repeats)", "studio_24", c["studio_24"]),
        ("distinct 1 MP", "distinct_1", c["distinct_1"]),
    ]
    lines = [
        "# Camera-size files: rembgd process vs rembg p",
        "",
        f"Generated by `bench/camera.py` (profile **{meta['profile']}**) on {meta['date']}; "
        f"the run took {meta['total_s'] / 60:.1f} min.",
        "",
        f"- **Machine:** {meta['machine']}. Load (`uptime`) at the start: {meta['load_start']}, "
        f"at the end: {meta['load_end']} (the 2 cores were shared with other jobs: absolute "
        "times are pessimistic for both tools; each ratio comes from one run of each, "
        "back to back, in alternating order).",
        "- **Same model and threads:** u2netp, 2 ONNX Runtime threads for both "
        "(`threads: 2`; `OMP_NUM_THREADS=2`). Both are cold commands over a folder, "
        "start-up included, as users run them; rembgd with a fresh cache, default legacy "
        "PNG output (level 1); rembg writes its PNG at Pillow's default level 6.",
        "",
        "## Side by side",
        "",
        "| Workload | Files | MP/file | `rembg p` wall (s) | `rembgd process` wall (s) | ratio | "
        "target | rembgd outcomes | peak RSS rembg / rembgd (MB) |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for label, key, r in rows:
        a, b = r["runs"]["rembg p"], r["runs"]["rembgd process"]
        target = f"≥ {TARGETS[key][0]}×: {verdict(key, r['ratio'])}" if key else "reported"
        lines.append(f"| {label} | {r['files']} | {r['mp']:.1f} | {a['wall_s']:.1f} | "
                     f"{b['wall_s']:.1f} | **{r['ratio']:.2f}×** | {target} | "
                     f"{b['stdout'][0]} | {a['peak_rss'] / 2**20:.0f} / "
                     f"{b['peak_rss'] / 2**20:.0f} |")
    lines += [
        "",
        "## rembgd alone",
        "",
        "| Measure | Value | Target |",
        "|---|---:|---|",
    ]
    for mp_key, key in (("1", "near_1_ms"), ("24", "near_24_ms")):
        n = near[mp_key]
        lines.append(f"| near hit, drop to output, {mp_key} MP (median of {len(n['near_ms'])}; "
                     f"outcomes {', '.join(sorted(set(n['tiers'])))}) | {n['median_ms']:.0f} ms "
                     f"(min {min(n['near_ms']):.0f}, max {max(n['near_ms']):.0f}; the first "
                     f"drop, a miss: {n['miss_ms']:.0f} ms) | < {TARGETS[key][0]:.0f} ms: "
                     f"{verdict(key, n['median_ms'])} |")
    lines.append(f"| `rembgd process` on an all-hit folder of {hits['files']} files, in all "
                 f"(median of 3: {', '.join(f'{w:.2f}' for w in hits['walls_s'])} s; "
                 f"{hits['stdout'][0]}) | {hits['median_s']:.2f} s | < 1 s: "
                 f"{verdict('all_hit_s', hits['median_s'])} |")
    for k in ("24", "100"):
        r = rss[k]
        lines.append(f"| peak RSS, one {r['mp']:.0f} MP miss (`rembgd process`, whole process "
                     f"with models) | {r['peak_rss'] / 2**20:.0f} MB = "
                     f"{r['mb_per_mp']:.1f} MB/MP | reported |")
    a, b = rss["24"], rss["100"]
    if b["mp"] > a["mp"]:
        slope = (b["peak_rss"] - a["peak_rss"]) / 2**20 / (b["mp"] - a["mp"])
        lines.append(f"| peak RSS per extra megapixel (between the two misses above) | "
                     f"{slope:.1f} MB/MP | reported |")
    s = data["soak"]
    growth = f"{s['growth'] * 100:+.1f} %" if s["growth"] is not None else "n/a"
    lines.append(f"| RSS after each of the distinct 24 MP files (MB) | "
                 f"{', '.join(str(v) for v in s['rss_after_mb'])} | flat: second half vs first "
                 f"(after the first file) {growth} |")
    lines += ["", "Per-file peak RSS grows with the image (decoded RGB 3 B/px, the full-size "
              "mask 1 B/px, the PNG output and its strip buffers) on top of ~0.3-0.5 GB of "
              "models and ONNX Runtime arenas; see the 24 and 100 MP rows for the slope.",
              "", "Reproduce: `.venv/bin/python bench/camera.py` (needs `rembg[cli]==2.0.86` "
              "in the venv, as `make bench` installs); `--quick` for a short run; raw data in "
              "`bench/out/camera/results.json`.", ""]
    if "refine" in data:
        lines += refine_section(data["refine"])
    lines += [NEAR_PROFILE,
              "![camera-size results](camera.png)", ""]
    md.write_text("\n".join(lines))
    _plot(data, png)


def _plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = data["compare"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["distinct 24 MP", "distinct 50-100 MP", "studio 24 MP", "distinct 1 MP"]
    keys = ["distinct_24", "distinct_big", "studio_24", "distinct_1"]
    ratios = [c[k]["ratio"] for k in keys]
    targets = [TARGETS.get(k, (None,))[0] for k in keys]
    ax1.bar(labels, ratios, color="#4a7")
    for i, t in enumerate(targets):
        if t:
            ax1.hlines(t, i - 0.4, i + 0.4, colors="k", linestyles="--")
    ax1.set_ylabel("rembg p wall ÷ rembgd process wall")
    ax1.set_title("speed-up (dashed: target)")
    ax1.tick_params(axis="x", labelrotation=15)
    run = c["distinct_24"]["runs"]["rembgd process"]
    ts, rs = zip(*run["rss_series"]) if run["rss_series"] else ((), ())
    ax2.plot(ts, [r / 2**20 for r in rs], lw=1)
    for t in run["outputs"].values():
        ax2.axvline(t, color="#ccc", lw=0.5)
    ax2.set_xlabel("s since start")
    ax2.set_ylabel("RSS (MB)")
    ax2.set_title("rembgd process, distinct 24 MP: RSS (grey: outputs)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# ------------------------------------------------------------------ main


def distinct_folders(p: dict) -> tuple[Path, Path]:
    d24 = folder(f"distinct24_{p['d24']}", {f"d{i:02d}.jpg": (lambda i=i: camera_jpeg(100 + i, (6000, 4000)))
                                            for i in range(p["d24"])})
    d1 = folder(f"distinct1_{p['d1']}", {f"m{i:02d}.jpg": (lambda i=i: camera_jpeg(300 + i, (1200, 900)))
                                         for i in range(p["d1"])})
    return d24, d1


def distinct24_only(n: int) -> None:
    """`rembg p` vs `rembgd process` over ``n`` distinct 24 MP files, in both orders."""
    d24, d1 = distinct_folders(dict(d24=n, d1=1))
    warm_up_rembg(d1)
    runs = [compare("distinct_24", d24, k) for k in (0, 1)]
    res = {"files": n, "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "runs": [
        {label: {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss"] / 2**20}
         for label, run in r["runs"].items()} | {"ratio": r["ratio"]} for r in runs]}
    (OUT / "distinct24.json").write_text(json.dumps(res, indent=1))
    for k, r in enumerate(res["runs"]):
        rp = r["rembg p"]
        log(f"pass {k + 1}: rembg p {rp['wall_s']:.1f} s, {rp['peak_rss_mb']:.0f} MB;"
            f" rembgd process {r['rembgd process']['wall_s']:.1f} s, "
            f"{r['rembgd process']['peak_rss_mb']:.0f} MB; ratio {r['ratio']:.2f}x")


def run_all(profile: str) -> dict:
    p = PROFILES[profile]
    t_start = now()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log("making images (cached under bench/out/camera/src) ...")
    d24, d1 = distinct_folders(p)
    big = folder(f"big_{len(p['big'])}", {f"b{i}.jpg": (lambda i=i, s=s: camera_jpeg(200 + i, s))
                                          for i, s in enumerate(p["big"])})
    studio = folder(f"studio24_{p['studio']}", studio_files(p["studio"], p["originals"]))
    warm_up_rembg(d1)
    compare_res = {}
    for k, (name, src) in enumerate((("distinct_1", d1), ("distinct_24", d24),
                                     ("studio_24", studio), ("distinct_big", big))):
        compare_res[name] = compare(name, src, k)
    log("all-hit folder ...")
    hits = all_hits(Path(compare_res["distinct_1"]["cfg"]), d1, min(p["hits"], p["d1"]))
    log(f"all-hit: {hits['walls_s']}")
    near = {}
    for mp, size in (("1", (1200, 900)), ("24", (6000, 4000))):
        log(f"near hits at {mp} MP ...")
        near[mp] = near_hits(mp, camera_jpeg(400 + int(mp), size), p["near"])
        log(f"near {mp} MP: {[round(x) for x in near[mp]['near_ms']]} ms {near[mp]['tiers']}")
    log("peak RSS of single misses ...")
    rss = {"24": single_rss("24", (d24 / "d00.jpg").read_bytes()),
           "100": single_rss("100", camera_jpeg(500, p["rss100"]))}
    meta = dict(profile=profile, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                total_s=now() - t_start, load_start=load_start,
                load_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                machine=f"{os.cpu_count()} logical cores, {platform.processor() or platform.machine()}, "
                        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM; Python "
                        f"{platform.python_version()}")
    return dict(meta=meta, compare=compare_res, near=near, all_hit=hits, rss=rss,
                soak=soak(compare_res["distinct_24"]["runs"]["rembgd process"]),
                refine=refine_cost(d24, d1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (development)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render camera.md/png from bench/out/camera/results.json")
    ap.add_argument("--out", default=str(BENCH), help="where camera.md and camera.png go")
    ap.add_argument("--refine-only", action="store_true",
                    help="only the refinement cost: replaces its section of camera.md")
    ap.add_argument("--distinct24", type=int, metavar="N",
                    help="only rembg p vs rembgd process over N distinct 24 MP files, twice")
    ap.add_argument("--profile-near", choices=("1", "24"),
                    help="only print a cProfile of one near hit at 1 or 24 MP")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.profile_near:
        profile_near(args.profile_near)
        return 0
    if args.distinct24:
        distinct24_only(args.distinct24)
        return 0
    if args.refine_only:
        res = refine_cost(*distinct_folders(PROFILES["quick" if args.quick else "full"]))
        (OUT / "refine.json").write_text(json.dumps(res, indent=1, default=str))
        patch_refine_section(Path(args.out) / "camera.md", refine_section(res))
        log(f"wrote the refinement section of {Path(args.out) / 'camera.md'}")
        return 0
    path = OUT / "results.json"
    if args.report_only:
        data = json.loads(path.read_text())
    else:
        data = run_all("quick" if args.quick else "full")
        path.write_text(json.dumps(data, indent=1, default=str))
    out = Path(args.out)
    write_report(data, out / "camera.md", out / "camera.png")
    log(f"wrote {out / 'camera.md'} and {out / 'camera.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
