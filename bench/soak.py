"""Soak: 5,000 files through one running daemon; RSS, descriptors and threads over time.

Mostly cache hits, so it is quick: 8 distinct photos are misses, 8 JPEG
re-encodes of them are near-duplicate hits, 8 PNG copies of their decoded
pixels are pixel hits, and every other file repeats one of those 24 contents
(exact hits). Files are written beside the inbox and renamed in, in batches,
keeping at most ``--backlog`` waiting; ``after_success: delete`` keeps the
inbox small, so any per-path state that is never freed would show up.

The daemon process is sampled every ``--interval`` seconds (psutil: RSS,
``num_fds``, ``num_threads``). The slopes are least-squares fits against the
number of files done, after a warm-up (the first ``--warmup`` files: lazy
imports, caches and the allocator settle). Writes ``bench/soak.md`` and exits
non-zero if a bound fails.

    python bench/soak.py [--files 5000] [--quick] [--out bench/soak.md]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import Sampler, write_config

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "cat",
          "immunohistochemistry", "camera")

# bounds checked at the end (after the warm-up)
MAX_RSS_GROWTH_MIB = 25.0
MAX_RSS_SLOPE_MIB_PER_1K = 2.0
MAX_FD_GROWTH = 2
MAX_THREAD_GROWTH = 0


def contents() -> list[bytes]:
    import skimage.data

    originals, near, pixel = [], [], []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.dstack([arr] * 3)
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3].astype(np.uint8)))
        for bucket, fmt, kw in ((originals, "JPEG", {"quality": 92}),
                                (near, "JPEG", {"quality": 75}), (pixel, "PNG", {})):
            buf = io.BytesIO()
            src = img  # the pixel tier: a PNG of exactly the pixels the original JPEG decodes to
            if bucket is pixel:
                src = Image.open(io.BytesIO(originals[-1])).convert("RGB")
            src.save(buf, fmt, **kw)
            bucket.append(buf.getvalue())
    return originals + near + pixel


def slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or max(xs) == min(xs):
        return 0.0
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--quick", action="store_true", help="1,000 files (a smoke run)")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--backlog", type=int, default=400)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "soak.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args, _unknown = ap.parse_known_args(argv)  # BENCH_ARGS meant for other benches
    if args.quick:
        args.files, args.warmup = 1000, 200

    pool = contents()
    work = Path(tempfile.mkdtemp(prefix="rembgd-soak-"))
    inbox, outbox, staging = work / "inbox", work / "outbox", work / "staging"
    for d in (inbox, outbox, staging):
        d.mkdir()
    cfg = write_config(work, args.models, pair={"after_success": "delete"}, settle_s=0.2,
                       threads=2, workers=2, progress_interval_s=10)
    log_path = work / "daemon.log"
    outputs = lambda: sum(1 for _ in os.scandir(outbox))  # noqa: E731
    log_fh = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "-c", str(cfg), "--log-format", "json",
                             "run"], stdout=log_fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while b'"started"' not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        sampler = Sampler(proc.pid, args.interval, lambda p: {
            "done": outputs(), "fds": p.num_fds(), "threads": p.num_threads()})
        t0 = time.monotonic()
        fed = 0
        while fed < args.files:  # feed in batches, keeping the backlog bounded
            backlog = fed - outputs()
            if backlog >= args.backlog:
                time.sleep(0.05)
                continue
            for _ in range(min(100, args.files - fed)):
                name = f"s{fed:05d}.{'png' if (fed % len(pool)) >= 16 else 'jpg'}"
                (staging / name).write_bytes(pool[fed % len(pool)])
                os.rename(staging / name, inbox / name)
                fed += 1
            if proc.poll() is not None:
                raise SystemExit(f"daemon died:\n{log_path.read_text()[-3000:]}")
        while outputs() < args.files:
            if time.monotonic() - t0 > 900 or proc.poll() is not None:
                raise SystemExit(f"stuck at {outputs()} of {args.files}:\n"
                                 f"{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        time.sleep(2.0)  # idle: lease threads, temp descriptors and queues drain
        sampler.finish()
        sampler.sample()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log_fh.close()

    events = [json.loads(line) for line in log_path.read_text().splitlines()
              if line.startswith("{")]
    tiers: dict[str, int] = {}
    for e in events:
        if e.get("event") == "processed":
            tiers[e["outcome"]] = tiers.get(e["outcome"], 0) + 1
    errors = [e for e in events if e.get("level") == "error"]
    samples = [{**x, "t": x["t"] - sampler.samples[0]["t"], "rss": x["rss"] / 2**20}
               for x in sampler.samples]
    report = write_report(args, samples, elapsed, tiers, errors, len(list(inbox.iterdir())))
    print(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    return 0 if report.ok else 1


class Report(str):
    ok: bool


def write_report(args, samples: list[dict], elapsed: float, tiers: dict, errors: list,
                 left: int) -> Report:
    start, end = samples[0], samples[-1]
    steady = [s for s in samples if s["done"] >= args.warmup]
    base = steady[0] if steady else start
    rows = []
    checks = []
    for key, label, unit in (("rss", "RSS", "MiB"), ("fds", "open fds", ""),
                             ("threads", "threads", "")):
        vals = [s[key] for s in samples]
        k = slope([s["done"] for s in steady], [s[key] for s in steady]) * 1000
        rows.append(f"| {label} | {start[key]:.1f} | {base[key]:.1f} | {end[key]:.1f} "
                    f"| {max(vals):.1f} | {k:+.3f} {unit}/1k files |")
        if key == "rss":
            growth = end[key] - base[key]
            checks.append((f"RSS growth after warm-up {growth:+.1f} MiB <= {MAX_RSS_GROWTH_MIB}",
                           growth <= MAX_RSS_GROWTH_MIB))
            checks.append((f"RSS slope {k:+.2f} MiB/1k files <= {MAX_RSS_SLOPE_MIB_PER_1K}",
                           k <= MAX_RSS_SLOPE_MIB_PER_1K))
        elif key == "fds":
            checks.append((f"fds end {end[key]} - start {start[key]} <= {MAX_FD_GROWTH}",
                           end[key] - start[key] <= MAX_FD_GROWTH))
        else:
            checks.append((f"threads end {end[key]} - start {start[key]} <= {MAX_THREAD_GROWTH}",
                           end[key] - start[key] <= MAX_THREAD_GROWTH))
    checks.append((f"all {args.files} files done, none left in the inbox ({left})", left == 0))
    checks.append((f"no error log lines ({len(errors)})", not errors))
    ok = all(c for _, c in checks)
    step = max(1, len(samples) // 12)
    shown = samples[:-1][::step] + [samples[-1]]
    timeline = "\n".join(f"| {s['t']:.0f} | {s['done']} | {s['rss']:.1f} | {s['fds']} "
                         f"| {s['threads']} |" for s in shown)
    text = f"""# Soak: {args.files} files through one running daemon

Generated by `bench/soak.py` ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores,
Python {sys.version.split()[0]}). Run it with `make bench` or `python bench/soak.py`.

Workload: 24 distinct contents (8 photos as misses, 8 JPEG re-encodes as near hits, 8 PNGs of
the same pixels as pixel hits), repeated to {args.files} files (exact hits); written beside the
inbox and renamed in, at most {args.backlog} waiting; `after_success: delete`, 2 workers,
settle 0.2 s. Sampled every {args.interval} s with psutil; slopes are least-squares fits
against files done, after a warm-up of {args.warmup} files.

**{args.files} files in {elapsed:.1f} s ({args.files / elapsed:.0f} files/s)**; tiers:
{', '.join(f'{k} {v}' for k, v in sorted(tiers.items()))}.

"start" is the idle daemon after start-up (models loaded); the step during the first files is
the first inferences (ONNX Runtime allocating its working memory), once. The bounds apply
from the warm-up on.

| metric | start | after warm-up | end (idle) | max | slope after warm-up |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Checks ({'all passed' if ok else 'FAILED'}):

{chr(10).join(f'- [{"x" if c else " "}] {t}' for t, c in checks)}

Timeline:

| t (s) | files done | RSS (MiB) | fds | threads |
|---|---|---|---|---|
{timeline}
"""
    args.out.write_text(text)
    rep = Report(text)
    rep.ok = ok
    return rep


if __name__ == "__main__":
    sys.exit(main())
