#!/usr/bin/env python3
"""rembgd against rembg's own CLI (`rembg p`, `rembg p -w`), side by side, in one run.

    make bench                      # the full suite: bench/results.md + bench/results.png
    .venv/bin/python bench/run.py --quick        # small counts, for development (~2 min)
    .venv/bin/python bench/run.py --report-only  # re-render from bench/out/run/results.json

Workloads (bench/workloads.py), all from the photos inside the scikit-image wheel:
distinct (every file new), studio (60% exact repeats and near-duplicates of 40
originals) and burst (1,000 small files dropped at once). For each workload,
interleaved in one run, with the same model (u2netp) and the same ONNX Runtime
thread count for both tools:

- ``rembg p -m u2netp IN OUT``: rembg's folder mode (cold command, as users run it);
- ``rembgd run``: a real daemon with a fresh cache; files are dropped into its
  inbox the way NAS clients do (temp name + rename) and each output is timed
  from inotify on the outbox, drop to output;
- ``rembg p -w``: rembg's watch mode; files are written straight into the
  folder (its best case: it misses renames) and timed the same way;
- the idle CPU of both watchers over the same window after the work, and the
  peak RSS of every process tree (psutil, sampled every 0.2 s).

rembg is pointed at the provisioned model (``U2NET_HOME``) and run with HTTP(S)
proxies set to a closed local port and ``HF_HUB_OFFLINE=1``: any download
attempt would fail loudly. Its sockets are sampled too; none may be remote.

Scratch data goes to bench/out/run/ (gitignored); results to bench/results.md
and bench/results.png, overwritten on every run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import workloads as wlmod  # noqa: E402
from common import tree_cpu, tree_rss, write_config  # noqa: E402
from measure import (Daemon, Monitor, OutputRecorder, drop_direct, drop_rename, now,  # noqa: E402
                     stop_process)

OUT = BENCH / "out" / "run"
HITS = ("exact", "pixel", "near")

# Counts and time caps. "full" is the sizes; rembg's runs are capped where
# the whole workload would not fit in the 10-minute budget (see results.md).
PROFILES = {
    "full": dict(distinct=100, studio=200, originals=40, burst=1000, burst_bases=100,
                 rembg_p_cap={"distinct": 90, "studio": 75, "burst": 40},
                 watch_sample={"distinct": 30, "studio": 20, "burst": 1000},
                 watch_cap={"distinct": 20, "studio": 20, "burst": 15},
                 idle_s=30, watch_idle_s=10, probe_hits=30, probe_near=5, watch_probe=2,
                 rename_check=5, budget_s=470),
    "quick": dict(distinct=10, studio=30, originals=6, burst=100, burst_bases=10,
                  rembg_p_cap={"distinct": 60, "studio": 30, "burst": 12},
                  watch_sample={"distinct": 5, "studio": 5, "burst": 100},
                  watch_cap={"distinct": 15, "studio": 15, "burst": 10},
                  idle_s=5, watch_idle_s=5, probe_hits=10, probe_near=2, watch_probe=2,
                  rename_check=2, budget_s=400),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Ctx:
    def __init__(self, args):
        self.args = args
        self.p = PROFILES["quick" if args.quick else "full"]
        self.threads = args.threads
        self.models = Path(args.models).resolve()
        self.mon = Monitor()
        self.rembg = str(Path(sys.executable).with_name("rembg"))
        self.env = {
            **os.environ,
            "U2NET_HOME": str(self.models),
            "OMP_NUM_THREADS": str(self.threads),
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "no_proxy": "", "NO_PROXY": "",
        }
        self.startup_rembg = 0.0
        self.live: set[int] = set()  # running processes we started (their CPU is ours)

    def own_cpu(self) -> float:
        t = os.times()  # this process and every child already waited for
        return (t.user + t.system + t.children_user + t.children_system
                + sum(tree_cpu(pid) for pid in list(self.live)))  # a reaped pid reads as 0

    def load_start(self) -> tuple[float, float, float]:
        return now(), busy_cpu_s(), self.own_cpu()

    def load_end(self, start: tuple[float, float, float]) -> float:
        """Cores used by other processes (not the benchmark's) since ``start``."""
        t0, b0, o0 = start
        el = max(now() - t0, 1e-6)
        return max(0.0, ((busy_cpu_s() - b0) - (self.own_cpu() - o0)) / el)

    def dir(self, *parts) -> Path:
        d = OUT.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d


# ----------------------------------------------------------------- phases


def rembg_out(name: str) -> str:
    return str(Path(name).with_suffix(".png"))  # rembg: (out / name).with_suffix(".png")


def rembg_startup(ctx: Ctx) -> float:
    """Seconds `rembg p` needs before its first file: imports + model session (empty folder)."""
    empty, out = ctx.dir("startup", "in"), ctx.dir("startup", "out")
    times = []
    for _ in range(2):  # the first also warms the page cache for the timed runs
        t0 = now()
        subprocess.run([ctx.rembg, "p", "-m", "u2netp", str(empty), str(out)], env=ctx.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(now() - t0)
    return min(times)


def cost_breakdown(ctx: Ctx, items: list[wlmod.Item], reps: int = 2) -> dict:
    """Where one new file's time goes, per stage, for both tools (in this process, same threads).

    Explains the distinct-workload ratio: both tools are bound by the same u2netp
    inference; the rest is what each does around it.
    """
    import io

    import numpy as np
    from PIL import Image

    os.environ["U2NET_HOME"] = str(ctx.models)
    os.environ["OMP_NUM_THREADS"] = str(ctx.threads)
    from rembg import new_session, remove

    from daemon.imaging import fingerprint as fpm
    from daemon.imaging import keys, render
    from daemon.config import OutputOptions
    from daemon.imaging.decode import decode
    from daemon.inference.engine import Engines

    eng = Engines(ctx.models, ctx.threads)
    mask_engine, embedder = eng.mask("u2netp"), eng.embedder()
    rsession = new_session("u2netp")
    opts = OutputOptions()
    (target,) = keys.targets("bench", opts, ())  # the legacy single PNG
    stages: dict[str, list[float]] = {}

    def timed(key, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        stages.setdefault(key, []).append((time.perf_counter() - t) * 1000)
        return out

    for it in items:
        for rep in range(reps):
            if rep == 0:  # warm-up pass per image: not recorded
                remove(it.data, session=rsession)
                mask_engine.predict(decode(it.data).rgb)
                continue
            decoded = timed("rembgd: decode", decode, it.data)
            rgb = decoded.rgb
            fp = timed("rembgd: fingerprints (sha256, pixel hash, pHash, thumbnails)",
                       fpm.fingerprint, it.data, rgb)
            timed("rembgd: EfficientNet-Lite0 embedding", embedder.embed, rgb)
            mask = timed("rembgd: u2netp mask", mask_engine.predict, rgb)
            timed(f"rembgd: cutout + PNG encode (level {opts.png_compression})",
                  render.render_target, target, decoded, mask)
            timed("rembgd: mask PNG for the cache", render.encode_mask, mask)
            del fp
            timed("rembg: remove() in all", remove, it.data, session=rsession)
            pil = Image.open(io.BytesIO(it.data)).convert("RGB")
            m = timed("rembg: u2netp mask", rsession.predict, pil)[0]
            cut = Image.composite(pil.convert("RGBA"), Image.new("RGBA", pil.size, 0), m)
            timed("rembg: PNG encode (level 6, its default)", cut.save, io.BytesIO(), "PNG")
    med = {k: float(np.median(v)) for k, v in stages.items()}
    med["rembgd: all stages"] = sum(v for k, v in med.items() if k.startswith("rembgd:"))
    mp = float(np.mean([i.size[0] * i.size[1] for i in items])) / 1e6
    del rsession, eng
    return dict(stages=med, images=len(items), mp=mp)


class RembgFolder:
    """`rembg p -m u2netp SRC OUT`, run in segments around rembgd's run (A-B-A).

    rembg skips inputs whose output exists, so a second command continues where the
    first was stopped: the two segments bracket rembgd's run in time, which cancels a
    linear drift of the background load. Outputs cut short by a stop are deleted.
    """

    def __init__(self, ctx: Ctx, wl: wlmod.Workload, src: Path):
        self.ctx, self.wl, self.src = ctx, wl, src
        self.d = ctx.dir(wl.name, "rembg_p")
        self.out = self.d / "out"
        shutil.rmtree(self.out, ignore_errors=True)
        self.order = [p.name for p in src.glob("**/*") if p.is_file()]  # rembg's own order
        self.label = f"{wl.name}/rembg p"
        self.segments: list[dict] = []
        self.done: dict[str, float] = {}  # name -> seconds since its segment's command start
        self.finished = False

    def run(self, cap: float) -> None:
        if self.finished or cap <= 0:
            return
        ctx = self.ctx
        rec = OutputRecorder(self.out)
        load = ctx.load_start()
        with open(self.d / "rembg.log", "ab") as fh:
            t0 = now()
            proc = subprocess.Popen([ctx.rembg, "p", "-m", "u2netp", str(self.src), str(self.out)],
                                    env=ctx.env, stdout=fh, stderr=subprocess.STDOUT)
            ctx.live.add(proc.pid)
            ctx.mon.watch(self.label, proc.pid, net=True)
            try:
                proc.wait(timeout=cap)
                capped = False
            except subprocess.TimeoutExpired:
                capped = True
            t_stop = now()
            ctx.mon.unwatch(self.label)
            stop_process(proc)
        rec.stop()
        new = {}
        for name in self.order:
            t = rec.times.get(rembg_out(name))
            if t is not None and t <= t_stop and name not in self.done:
                new[name] = t - t0
        for f in self.out.iterdir():  # cut short by the stop: rembg would skip it next time
            if f.name not in {rembg_out(n) for n in (*self.done, *new)}:
                f.unlink()
        self.done.update(new)
        self.finished = not capped
        self.segments.append(dict(elapsed_s=t_stop - t0, done=len(new), capped=capped, cap_s=cap,
                                  rc=proc.returncode, foreign_cores=ctx.load_end(load)))
        log(f"{self.label}: +{len(new)} ({len(self.done)}/{len(self.order)}) in {t_stop - t0:.1f}s"
            f"{' (capped)' if capped else ''}")

    def result(self) -> dict:
        ctx, n = self.ctx, len(self.wl.items)
        st = ctx.startup_rembg
        segs = self.segments
        work = sum(max(s["elapsed_s"] - st, 1e-6) for s in segs)
        rate = len(self.done) / work if work else None  # files/s once started
        whole = len(segs) == 1 and self.finished
        res = dict(tool="rembg p", mode="folder", n=n, done=len(self.done),
                   capped=not self.finished, cap_s=sum(s["cap_s"] for s in segs), startup_s=st,
                   segments=segs, peak_rss=ctx.mon.peak(self.label),
                   remote=sorted(ctx.mon.remote.get(self.label, ())),
                   foreign_cores=(sum(s["foreign_cores"] * s["elapsed_s"] for s in segs)
                                  / max(sum(s["elapsed_s"] for s in segs), 1e-6)))
        if whole:
            wall = segs[0]["elapsed_s"]
            res.update(wall_s=wall, extrapolated=False, latency=dict(self.done))
        else:
            # One uninterrupted command over the whole folder, from the measured rate: rembg has
            # no cache, so every file costs the same. Per-file latency: start-up + position/rate.
            wall = st + n / rate if rate else None
            lat = {name: (st + (k + 1) / rate if rate else None) for k, name in enumerate(self.order)}
            res.update(wall_s=wall, extrapolated=not self.finished, modelled=True, latency=lat,
                       measured_s=sum(s["elapsed_s"] for s in segs))
        res["files_s"] = n / wall if wall else None
        res["files_s_excl"] = rate if not whole else (n / (wall - st) if wall else None)
        return res


def fresh_config(ctx: Ctx, d: Path) -> Path:
    """Empty folders, paths, threads and JSON logs; the rest is rembgd's built-in default."""
    for sub in ("inbox", "outbox", "cache"):
        shutil.rmtree(d / sub, ignore_errors=True)
    return write_config(d, ctx.models, threads=ctx.threads, logging={"level": "info"})


def wait_processed(daemon: Daemon, names: set[str], timeout: float) -> dict[str, dict]:
    deadline = now() + timeout
    while True:
        got = {Path(p).name: e for p, e in daemon.processed().items()}
        if names.issubset(got):
            return got
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"rembgd exited ({daemon.proc.returncode}); see {daemon.log}")
        if now() > deadline:
            log(f"rembgd: only {len(names & got.keys())}/{len(names)} processed in {timeout:.0f}s")
            return got
        time.sleep(0.05)


def phase_rembgd(ctx: Ctx, wl: wlmod.Workload, probe: bool) -> tuple[dict, Daemon]:
    d = ctx.dir(wl.name, "rembgd")
    cfg = fresh_config(ctx, d)
    logf = d / "rembgd.log"
    logf.unlink(missing_ok=True)
    daemon = Daemon(cfg, logf, ctx.env).start()
    label = f"{wl.name}/rembgd run"
    pid = daemon.proc.pid
    ctx.live.add(pid)
    ctx.mon.watch(label, pid)
    inbox, outbox = d / "inbox", d / "outbox"
    rec = OutputRecorder(outbox)
    rss0 = tree_rss(pid)
    names = {it.name for it in wl.items}
    drops: dict[str, float] = {}
    load = ctx.load_start()
    t0 = now()
    for it in wl.items:
        drops[it.name] = drop_rename(inbox, it.name, it.data)
    t_dropped = now()
    got = wait_processed(daemon, names, timeout=max(180.0, 1.5 * len(names)))
    ok = {n for n in names if got.get(n, {}).get("outcome") in (*HITS, "miss")}
    rec.wait({n + ".png" for n in ok}, 10)
    lat = {n: rec.times[n + ".png"] - drops[n] for n in ok if n + ".png" in rec.times}
    t_last = max((rec.times[n + ".png"] for n in ok if n + ".png" in rec.times), default=now())
    wall = t_last - t0
    foreign = ctx.load_end(load)
    outcomes = Counter(got[n]["outcome"] for n in names if n in got)
    n = len(names)
    # memory through the work: before the drop, once 10% of outputs exist, at the end
    series = ctx.mon.series(label)
    order = sorted(rec.times[k + ".png"] for k in lat)
    t10 = order[max(0, len(order) // 10 - 1)] if order else t0
    rss_at = lambda t: min(series, key=lambda s: abs(s[0] - t))[1] if series else 0  # noqa: E731
    res = dict(tool="rembgd run", mode="watch", n=n, done=len(lat), capped=False,
               wall_s=wall, files_s=n / wall if wall else None, drop_s=t_dropped - t0,
               startup_s=daemon.startup_s, latency=lat,
               outcome={k: got[k]["outcome"] for k in names if k in got},
               internal_ms={k: got[k].get("ms") for k in names if k in got},
               outcomes=dict(outcomes), rss_start=rss0, rss_10pct=rss_at(t10),
               rss_end=rss_at(t_last), foreign_cores=foreign, series=[(t - t0, r) for t, r, _ in list(series)])
    log(f"{label}: {len(lat)}/{n} in {wall:.1f}s, {res['files_s']:.2f} files/s, {dict(outcomes)}")
    if probe:
        res["probe"] = exact_hit_probe(ctx, daemon, inbox, rec)
    res["peak_rss"] = ctx.mon.peak(label)
    res["t_done"] = now()
    rec.stop()
    return res, daemon


def exact_hit_probe(ctx: Ctx, daemon: Daemon, inbox: Path, rec: OutputRecorder) -> dict:
    """Drop-to-output of a 1024x1024 JPEG: first (miss), then exact repeats and re-encodes."""
    data = wlmod.probe_1024()
    t = drop_rename(inbox, "probe_first.jpg", data)
    rec.wait({"probe_first.jpg.png"}, 60)
    first = rec.times.get("probe_first.jpg.png", float("nan")) - t
    hits, near = [], []
    time.sleep(0.5)
    for k in range(ctx.p["probe_hits"]):
        name = f"probe_hit{k:03d}.jpg"
        t = drop_rename(inbox, name, data)
        if rec.wait({name + ".png"}, 20):
            hits.append(rec.times[name + ".png"] - t)
        time.sleep(0.1)
    from PIL import Image
    import io

    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    for k in range(ctx.p["probe_near"]):
        name = f"probe_near{k:03d}.jpg"
        t = drop_rename(inbox, name, wlmod.encode_jpeg(rgb, quality=80 - k))
        if rec.wait({name + ".png"}, 30):
            near.append(rec.times[name + ".png"] - t)
        time.sleep(0.1)
    got = wait_processed(daemon, {"probe_first.jpg"}, 5)
    outc = {k: v["outcome"] for k, v in got.items() if k.startswith("probe_")}
    ms = {k: v.get("ms") for k, v in got.items() if k.startswith("probe_")}
    log(f"probe 1024²: first {first * 1e3:.0f} ms, exact median "
        f"{sorted(hits)[len(hits) // 2] * 1e3 if hits else float('nan'):.1f} ms over {len(hits)}")
    return dict(first=first, hits=hits, near=near, outcome=outc, internal_ms=ms, bytes=len(data))


def phase_rembg_watch(ctx: Ctx, wl: wlmod.Workload, cap: float, probe: bool, rename_check: bool):
    d = ctx.dir(wl.name, "rembg_w")
    inbox, outbox = d / "in", d / "out"
    for f in (inbox, outbox):
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
    # one file present at start: its output tells us the model is loaded and the observer is next
    (inbox / "_warm.jpg").write_bytes(wlmod.encode_jpeg(wlmod.composite(99, (320, 240))))
    rec = OutputRecorder(outbox)
    label = f"{wl.name}/rembg p -w"
    logf = open(d / "rembg-w.log", "wb")
    t_start = now()
    proc = subprocess.Popen([ctx.rembg, "p", "-w", "-m", "u2netp", str(inbox), str(outbox)],
                            env=ctx.env, stdout=logf, stderr=subprocess.STDOUT)
    ctx.mon.watch(label, proc.pid, net=True)
    ctx.live.add(proc.pid)
    alive = lambda: proc.poll() is None  # noqa: E731
    if not rec.wait({"_warm.png"}, 120, alive=alive):
        raise RuntimeError(f"rembg p -w did not start; see {d / 'rembg-w.log'}")
    startup = now() - t_start
    time.sleep(1.5)  # its observer starts right after the initial pass over the folder
    sample = wl.items[:ctx.p["watch_sample"][wl.name]]
    cpu0, rss0 = tree_cpu(proc.pid), tree_rss(proc.pid)
    drops = {}
    load = ctx.load_start()
    t0 = now()
    for it in sample:
        drops[it.name] = drop_direct(inbox, it.name, it.data)
    expected = {rembg_out(n) for n in drops}
    rec.wait(expected, cap, alive=alive)
    t_stop = now()
    foreign = ctx.load_end(load)
    lat = {n: rec.times[rembg_out(n)] - drops[n] for n in drops
           if rec.times.get(rembg_out(n), float("inf")) <= t_stop}
    capped = len(lat) < len(drops)
    n = len(drops)
    if capped:
        for name in drops:
            lat.setdefault(name, None)  # not done within the cap: censored
    done_t = [rec.times[rembg_out(k)] for k, v in lat.items() if v is not None]
    wall = (max(done_t) - t0) if done_t and not capped else None
    rate = (len(done_t) / (t_stop - t0)) if capped else (n / wall if wall else None)
    res = dict(tool="rembg p -w", mode="watch", n=n, done=len(done_t), capped=capped, cap_s=cap,
               workload_n=len(wl.items), wall_s=wall, files_s=rate, latency=lat,
               startup_s=startup, rss_start=rss0, rss_end=tree_rss(proc.pid),
               cpu_during_s=tree_cpu(proc.pid) - cpu0, measured_s=t_stop - t0,
               foreign_cores=foreign)
    log(f"{label}: {len(done_t)}/{n} in {t_stop - t0:.1f}s{' (capped)' if capped else ''}"
        f", {rate or 0:.2f} files/s")
    if probe and alive():
        data = wlmod.probe_1024()
        reps = []
        for k in range(ctx.p["watch_probe"]):
            name = f"probe_hit{k:03d}.jpg"
            t = drop_direct(inbox, name, data)
            if rec.wait({rembg_out(name)}, 30, alive=alive):
                reps.append(rec.times[rembg_out(name)] - t)
        res["probe"] = reps
    if rename_check and alive():
        names = []
        for k, it in enumerate(wl.items[-ctx.p["rename_check"]:]):
            name = f"renamed{k:03d}.jpg"
            drop_rename(inbox, name, it.data)
            names.append(rembg_out(name))
        rec.wait(set(names), 6, alive=alive)
        res["rename_check"] = dict(dropped=len(names), output=sum(n in rec.times for n in names))
    res["peak_rss"] = ctx.mon.peak(label)
    res["t_done"] = now()
    rec.stop()
    return res, proc, logf


def idle_cpu(ctx: Ctx, label: str, pid: int, seconds: float) -> dict:
    """CPU (% of one core) of a watcher over the last ``seconds``, from the monitor's samples."""
    t_end, c_end = now(), tree_cpu(pid)
    first = ctx.mon.cpu_since(label, t_end - seconds)
    t0, c0 = first if first else (t_end, c_end)
    el = max(t_end - t0, 1e-6)
    return dict(cpu_pct=100 * (c_end - c0) / el, window_s=el, rss_end=tree_rss(pid))


def phase_rembgd_process(ctx: Ctx, wl: wlmod.Workload, src: Path) -> dict:
    d = ctx.dir(wl.name, "rembgd_process")
    cfg = fresh_config(ctx, d)
    out = d / "out"
    rec = OutputRecorder(out)
    label = f"{wl.name}/rembgd process"
    with open(d / "process.log", "wb") as fh:
        t0 = now()
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "-c", str(cfg), "--log-format", "json",
                                 "process", str(src), "-o", str(out)], env=ctx.env, cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT)
        ctx.mon.watch(label, proc.pid)
        ctx.live.add(proc.pid)
        load = ctx.load_start()
        proc.wait()
        wall = now() - t0
        foreign = ctx.load_end(load)
        ctx.mon.unwatch(label)
    rec.stop()
    outcome = {}
    for line in (d / "process.log").read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "processed":
            outcome[Path(e["path"]).name] = e["outcome"]
    lat = {n: rec.times[n + ".png"] - t0 for n in outcome if n + ".png" in rec.times}
    n = len(wl.items)
    log(f"{label}: {len(lat)}/{n} in {wall:.1f}s")
    return dict(tool="rembgd process", mode="folder", n=n, done=len(lat), capped=False, wall_s=wall,
                files_s=n / wall, latency=lat, outcome=outcome, outcomes=dict(Counter(outcome.values())),
                peak_rss=ctx.mon.peak(label), rc=proc.returncode, foreign_cores=foreign)


def rembg_w_log_stats(path: Path) -> dict:
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    return dict(processed=sum(line.startswith("processed:") for line in lines),
                truncated=sum("truncated" in line.lower() for line in lines),
                other_errors=sum(1 for line in lines if line and not line.startswith("processed:")
                                 and "truncated" not in line.lower()))


# ------------------------------------------------------------------- main


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import rembg
    return dict(cores=os.cpu_count(), physical=psutil.cpu_count(logical=False), cpu=model,
                ram_gb=psutil.virtual_memory().total / 2**30, python=platform.python_version(),
                kernel=platform.release(), onnxruntime=onnxruntime.__version__,
                rembg=getattr(rembg, "__version__", "2.0.86"))


def busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def own_cpu_s() -> float:
    t = os.times()  # waited-for children (every tool we started) are included
    return t.user + t.system + t.children_user + t.children_system


def models_snapshot(models: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(models.iterdir())}


# rembgd's wall time per workload, in units of one new 1-MP file's pipeline cost, at full size:
# distinct = 100 misses; studio ~ 84 misses + 116 cheap hits; burst ~ 105 misses of small
# files + 895 cheap hits (measured: 145 s, 141 s and 139 s at 1.35 s per unit), plus 10%.
UNITS = {"distinct": 110, "studio": 105, "burst": 105}
OVERHEAD_S = 45  # per workload: daemon and rembg -w start-up, rembg -w cap, idle, probe
MIN_CAP_S = 20   # the least rembg p gets per workload


def plan_scale(p: dict, unit_s: float, left_s: float, n_workloads: int) -> float:
    """Fraction of the issue's sizes that fits the time left, given this machine's speed now."""
    need = sum(UNITS.values()) * n_workloads / 3 * unit_s
    room = left_s - n_workloads * (OVERHEAD_S + MIN_CAP_S) - 10
    return max(0.2, min(1.0, room / need)) if need > 0 else 1.0


def cached_workload(name: str, sizes: dict) -> wlmod.Workload:
    """Workloads are deterministic: keep them between runs (keyed by sizes and generator code)."""
    import hashlib
    import pickle

    args = {"distinct": (sizes["distinct"],), "studio": (sizes["studio"], sizes["originals"]),
            "burst": (sizes["burst"], sizes["burst_bases"])}[name]
    code = hashlib.sha256((BENCH / "workloads.py").read_bytes()).hexdigest()[:12]
    path = BENCH / "out" / "cache" / f"{name}-{'-'.join(map(str, args))}-{code}.pkl"
    if path.is_file():
        try:
            return pickle.loads(path.read_bytes())
        except Exception:
            pass
    wl = getattr(wlmod, name)(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(wl))
    tmp.replace(path)
    return wl


def run_all(args) -> dict:
    ctx = Ctx(args)
    p = ctx.p
    if not Path(ctx.rembg).exists():
        sys.exit(f"{ctx.rembg} not found: install the bench extras (`make bench` does: "
                 "pip install 'rembg[cli]==2.0.86')")
    if not (ctx.models / "u2netp.onnx").is_file():
        sys.exit(f"no u2netp.onnx in {ctx.models}: run `make models`")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    home_before = {d: (Path.home() / d).exists() for d in (".u2net", ".rembg")}
    models_before = models_snapshot(ctx.models)
    wall0, busy0, own0 = now(), busy_cpu_s(), own_cpu_s()
    meta = dict(date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                machine=machine(), load_start=os.getloadavg(), threads=ctx.threads,
                profile="quick" if args.quick else "full", params=p)
    log(f"profile {meta['profile']}, {ctx.threads} threads, load {meta['load_start']}")

    ctx.startup_rembg = rembg_startup(ctx)
    meta["rembg_startup_s"] = ctx.startup_rembg
    log(f"rembg p start-up (empty folder): {ctx.startup_rembg:.1f}s")

    # the first distinct photos of >= 0.7 MP: the cost breakdown, and the speed of this machine now
    sample = [it for it in wlmod.distinct(8).items if it.size[0] * it.size[1] >= 700_000][:3]
    meta["breakdown"] = cost_breakdown(ctx, sample)
    log("cost of one new file: " + ", ".join(f"{k} {v:.0f} ms"
                                              for k, v in meta["breakdown"]["stages"].items()))
    budget = args.budget or p["budget_s"]
    only = args.only.split(",") if args.only else ["distinct", "studio", "burst"]
    scale = 1.0 if args.no_scale or args.quick else plan_scale(
        p, meta["breakdown"]["stages"]["rembgd: all stages"] / 1000, budget - (now() - wall0),
        len(only))
    meta["scale"] = scale
    unit_s, corr = meta["breakdown"]["stages"]["rembgd: all stages"] / 1000, 1.0
    rembg_unit_s = 1.1 * meta["breakdown"]["stages"]["rembg: remove() in all"] / 1000
    if scale < 1:
        log(f"this machine is too slow right now for the full sizes in {budget:.0f}s: "
            f"scaling the workloads to {scale:.0%}")
    sizes = dict(distinct=round(p["distinct"] * scale), studio=round(p["studio"] * scale),
                 originals=max(1, round(p["originals"] * scale)), burst=round(p["burst"] * scale),
                 burst_bases=max(1, round(p["burst_bases"] * scale)))
    meta["sizes"] = sizes

    results: dict[str, dict] = {}
    deadline = wall0 + (args.budget or p["budget_s"])
    for i, name in enumerate(only):
        t_g = now()
        wl = cached_workload(name, sizes)
        src = ctx.dir(name, "src")
        wlmod.write(wl.items, src)
        srcs = {name: src}
        log(f"== {name}: {wl.note} (ready in {now() - t_g:.1f}s)")
        r: dict = {"note": wl.note, "meta": wl.meta, "kinds": {it.name: it.kind for it in wl.items}}
        t_w = now()
        # what is left of the time budget, shared by the workloads still to run, caps rembg's
        # runs (rembg has no cache, so its rate over a cap carries over to the whole workload)
        # after what rembgd is expected to need (corrected by how the previous workloads went)
        share = (deadline - now()) / (len(only) - i)
        pred = UNITS[name] * scale * unit_s * corr
        cap_w = min(p["watch_cap"][name], max(8.0, 0.10 * share))
        cap_p = min(p["rembg_p_cap"][name], max(MIN_CAP_S, share - pred - OVERHEAD_S))
        # A-B-A: rembg p runs half its cap before rembgd and resumes after it, so a drifting
        # background load weighs on both alike
        # (the first segment aims at about half the workload, so the two really bracket rembgd)
        folder = RembgFolder(ctx, wl, srcs[name])
        half = ctx.startup_rembg + 0.5 * len(wl.items) * rembg_unit_s * corr
        seg1 = min(cap_p / 2, max(5.0, half))
        folder.run(seg1)
        r["rembgd run"], daemon = phase_rembgd(ctx, wl, probe=name == "studio")
        corr = max(0.5, r["rembgd run"]["wall_s"] / (UNITS[name] * scale * unit_s))
        left = t_w + share - now() - (OVERHEAD_S - 15) - cap_w
        folder.run(min(cap_p - seg1, max(MIN_CAP_S / 2, left)))
        r["rembg p"] = folder.result()
        log(f"{name}/rembg p: {r['rembg p']['files_s']:.2f} files/s "
            f"({r['rembg p']['files_s_excl']:.2f} excl. start-up)")
        w, wproc, wlog = phase_rembg_watch(ctx, wl, cap_w, probe=name == "studio",
                                           rename_check=name == "distinct")
        r["rembg p -w"] = w
        # Idle: rembg -w over its own window; rembgd over the last idle_s seconds before it is
        # stopped, all of them after its last output (rembg may run meanwhile: a process's own
        # CPU time does not depend on what else runs).
        d_label, w_label = f"{name}/rembgd run", f"{name}/rembg p -w"
        t_ready = r["rembgd run"]["t_done"] + 1.0
        wait = max(p["watch_idle_s"], t_ready + p["idle_s"] - now())
        w0 = (now(), tree_cpu(wproc.pid), tree_rss(wproc.pid))
        time.sleep(wait)
        el = now() - w0[0]
        r["rembg p -w"]["idle"] = dict(cpu_pct=100 * (tree_cpu(wproc.pid) - w0[1]) / el, window_s=el,
                                       rss_start=w0[2], rss_end=tree_rss(wproc.pid))
        r["rembgd run"]["idle"] = idle_cpu(ctx, d_label, daemon.proc.pid, p["idle_s"])
        r["rembgd run"]["idle"]["after_last_output_s"] = (
            now() - r["rembgd run"]["idle"]["window_s"] - r["rembgd run"]["t_done"])
        r["rembg p -w"]["remote"] = sorted(ctx.mon.remote.get(w_label, ()))
        r["rembg p -w"]["peak_rss"] = ctx.mon.peak(w_label)
        r["rembgd run"]["peak_rss"] = ctx.mon.peak(d_label)
        ctx.mon.unwatch(w_label)
        ctx.mon.unwatch(d_label)
        stop_process(wproc)
        wlog.close()
        r["rembg p -w"]["log"] = rembg_w_log_stats(ctx.dir(name, "rembg_w") / "rembg-w.log")
        daemon.stop()
        if args.process:
            r["rembgd process"] = phase_rembgd_process(ctx, wl, srcs[name])
        r["elapsed_s"] = now() - t_w
        for tool in ("rembgd run", "rembg p -w"):
            r[tool].pop("t_done", None)
        results[name] = r
        log(f"== {name} took {r['elapsed_s']:.0f}s (total {now() - wall0:.0f}s)")

    ctx.mon.stop()
    total = now() - wall0
    foreign = (busy_cpu_s() - busy0) - (own_cpu_s() - own0)
    meta.update(total_s=total, load_end=os.getloadavg(),
                foreign_cores=max(0.0, foreign) / total,
                network=dict(
                    remote_sockets=sorted({a for k, v in ctx.mon.remote.items() if "rembg p" in k
                                           for a in v}),
                    home_created=[d for d, was in home_before.items()
                                  if not was and (Path.home() / d).exists()],
                    models_unchanged=models_snapshot(ctx.models) == models_before))
    return dict(meta=meta, workloads=results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts and short windows (development)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="ONNX Runtime threads for both tools (default: all cores)")
    ap.add_argument("--models", default=str(ROOT / "var" / "models"))
    ap.add_argument("--only", help="comma-separated workloads (distinct,studio,burst)")
    ap.add_argument("--process", action="store_true",
                    help="also time `rembgd process` (folder mode) per workload (+~2 min)")
    ap.add_argument("--budget", type=float,
                    help="seconds the whole run may take; rembg's caps shrink to fit (default: "
                         "470 full, leaving room for the soak in `make bench`; 400 quick)")
    ap.add_argument("--no-scale", action="store_true",
                    help="run the full sizes even if the machine is too slow for the budget")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render results.md/png from bench/out/run/results.json")
    ap.add_argument("--out", default=str(BENCH), help="where results.md and results.png go")
    args = ap.parse_args()
    import report

    data_path = OUT / "results.json"
    if args.report_only:
        data = json.loads(data_path.read_text())
    else:
        data = run_all(args)
        data_path.write_text(json.dumps(data, indent=1, default=str))
    out = Path(args.out)
    report.write_markdown(data, out / "results.md")
    report.plot(data, out / "results.png")
    log(f"wrote {out / 'results.md'} and {out / 'results.png'} "
        f"(run took {data['meta']['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
