"""The status page and /metrics of a real `rembgd run`, timed with real HTTP requests.

For each journal size (default 100 and 10,000 outputs) a work folder gets that many
real output files (outbox) and sources (done/), the recent-outputs journal gets one
row per output (written with ``daemon.web.journal.Journal``, as the daemon does), and
failed/ gets 20 failed files with sidecars. A first daemon run processes one real
photo, and its SQLite cache index is then grown to ``--cache-entries`` rows (copies of
that real row: each /metrics scrape counts them). A second daemon processes 6 real
photos (misses and exact hits, so /metrics has series), and then each request is
timed from connect to the last byte: the page (median and p95 over ``--requests``),
/metrics, and the thumbnails of the newest outputs (made on the first request, cached
after).

``--desk N``: the review desk instead (bench/web_desk.md): the page and the JSON API
(newest, name/tier/date search, deep offsets) over N journal rows, served by the real
server in-process over real HTTP; the item view's 2048 px previews of a 24 MP source
made ahead by the prefetcher, then the item view's first paint (its HTML and the two
previews over real HTTP); and the touch-up of that source (correction, refinement, PNG,
atomic write), ``--touchups`` runs on the workbench interleaved with as many from the
file (decode and fingerprint too).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.web.controller import RecentOutput  # noqa: E402
from daemon.web.journal import Journal  # noqa: E402

PAGE_TARGET_MS, METRICS_TARGET_MS = 200.0, 20.0


def sample_files() -> tuple[bytes, bytes]:
    """(a real JPEG photo, a real RGBA cutout PNG of it)."""
    import skimage.data

    rgb = skimage.data.chelsea()
    src = io.BytesIO()
    Image.fromarray(rgb).save(src, "JPEG", quality=90)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[40:260, 80:380] = 255
    out = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(out, "PNG", compress_level=1)
    return src.getvalue(), out.getvalue()


def photos() -> list[bytes]:
    import skimage.data

    out = []
    for name in ("astronaut", "coffee", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def seed(work: Path, n: int, models: Path) -> Path:
    src, png = sample_files()
    inbox, outbox, done, failed = (work / d for d in ("inbox", "outbox", "done", "failed"))
    for d in (inbox, outbox, done, failed):
        d.mkdir(parents=True)
    journal = Journal(work / "cache" / "web" / "recent.sqlite", keep=max(n, 1))
    now = time.time() - n
    for i in range(n):
        rel = f"shoot{i // 100:03d}/img{i:05d}.jpg"
        (done / rel).parent.mkdir(exist_ok=True)
        (outbox / rel).parent.mkdir(exist_ok=True)
        (done / rel).write_bytes(src)
        (outbox / (rel + ".png")).write_bytes(png)
        journal.add(RecentOutput(now + i, "main", "done", rel, (rel + ".png",),
                                 ("exact", "near", "miss")[i % 3], "u2netp", 420.0))
    journal.close()
    for i in range(20):
        bad = failed / f"bad{i:02d}.jpg"
        bad.write_bytes(b"not an image")
        (failed / f"bad{i:02d}.jpg.error.json").write_text(json.dumps(
            {"file": str(bad), "reason": "unsupported", "error": "not a supported image",
             "unix_time": now + i}))
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "watch": [{"inbox": str(inbox), "outbox": str(outbox), "done_dir": str(done),
                   "failed_dir": str(failed), "after_success": "move"}],
        "models": {"dir": str(models)},
        "logging": {"format": "json"}, "web": {"listen": "127.0.0.1:0"},
        "cache": {"dir": str(work / "cache"), "limits": {"max_entries": 0, "max_bytes": 0}},
        "settle_s": 0.2}))
    return cfg


def wait_for_log(proc: subprocess.Popen, log: Path, events: tuple[str, ...]) -> None:
    """Until one of ``events`` is logged: the start-up prune pass over the whole index
    (hourly after that) would otherwise share the CPU with the requests timed."""
    deadline = time.monotonic() + 300
    while not any(e in log.read_text(errors="replace") for e in events):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"no {events[0]} in {log}")
        time.sleep(0.2)


def drop_and_wait(work: Path, proc: subprocess.Popen, files: dict[str, bytes]) -> None:
    """Drop ``files`` into the inbox and wait until the daemon has moved them to done/."""
    for name, data in files.items():
        (work / "inbox" / name).write_bytes(data)
    deadline = time.monotonic() + 300
    while any((work / "inbox").iterdir()):  # after_success: move
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"photos not processed (see {work})")
        time.sleep(0.2)


def grow_cache_index(work: Path, rows: int) -> int:
    """Copy the index's first real row until it holds ``rows`` entries (new ids)."""
    db = sqlite3.connect(work / "cache" / "index.sqlite3")
    cols = [c[1] for c in db.execute("PRAGMA table_info(entries)")]
    have = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    select = ", ".join("e.id || '-' || n.i" if c == "id" else f"e.{c}" for c in cols)
    db.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
               f"INSERT INTO entries ({', '.join(cols)}) SELECT {select} FROM entries e, n "
               f"WHERE e.rowid = (SELECT min(rowid) FROM entries)", (max(0, rows - have),))
    db.commit()
    total = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    db.close()
    return total


def timed_get(port: int, path: str) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return (time.perf_counter() - t0) * 1000, resp.status, body


def run_daemon(cfg: Path, log: Path) -> tuple[subprocess.Popen, int]:
    fh = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "-c", str(cfg), "run"],
                            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r'"url": "http://127\.0\.0\.1:(\d+)/"', log.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise SystemExit("daemon did not start its web server")


def measure(n: int, requests: int, models: Path, cache_entries: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"rembgd-web-{n}-"))
    cfg = seed(work, n, models)
    pool = photos()
    proc, _port = run_daemon(cfg, work / "daemon-first.log")  # makes the cache index
    try:
        drop_and_wait(work, proc, {"first.jpg": pool[0]})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    entries = grow_cache_index(work, cache_entries)
    proc, port = run_daemon(cfg, work / "daemon.log")
    try:
        drop_and_wait(work, proc, {f"{batch}{i}.jpg": data for batch in "ab"
                                   for i, data in enumerate(pool)})  # misses and exact hits
        wait_for_log(proc, work / "daemon.log", ('"cache_pruned"', '"cache_prune_skipped"'))
        for _ in range(5):  # warm-up: imports, first connections
            timed_get(port, "/")
            timed_get(port, "/metrics")
        page = [timed_get(port, "/") for _ in range(requests)]
        assert all(status == 200 for _, status, _ in page)
        html = page[-1][2].decode()
        thumbs = re.findall(r'src="(/thumb\?[^"]+)"', html)
        first = [timed_get(port, t.replace("&amp;", "&"))[0] for t in thumbs]
        cached = [timed_get(port, t.replace("&amp;", "&"))[0] for t in thumbs]
        metrics = [timed_get(port, "/metrics") for _ in range(requests)]
        assert all(status == 200 for _, status, _ in metrics)
        scraped = metrics[-1][2].decode()
        counted = float(re.search(r"^rembgd_cache_entries (\S+)$", scraped, re.M).group(1))
        assert counted >= entries  # the grown index, plus this run's misses
        assert 'tier="exact"}' in scraped and 'tier="miss"}' in scraped
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    ms = sorted(t for t, _, _ in page)
    mm = sorted(t for t, _, _ in metrics)
    return {"outputs": n, "cache_entries": entries, "page_median": statistics.median(ms),
            "page_p95": ms[int(len(ms) * 0.95) - 1], "page_kb": len(page[-1][2]) / 1024,
            "metrics_median": statistics.median(mm), "metrics_p95": mm[int(len(mm) * 0.95) - 1],
            "thumbs": len(thumbs), "thumb_first": statistics.median(first),
            "thumb_cached": statistics.median(cached)}


class _DeskController:
    """The page's Controller over a real journal and nothing else (the review desk's
    list and API cost is the journal's; the daemon adds its status snapshot)."""

    def __init__(self, journal, roots):
        self.journal, self._roots = journal, roots

    def snapshot(self):
        from daemon.web.controller import PairView
        return {"pairs": [PairView("main", str(self._roots["inbox"]), str(self._roots["outbox"]),
                                   "watching")], "queued": 0, "in_progress": 0,
                "line": "idle; since start: 0 hits / 0 misses"}

    def search_outputs(self, q, limit, offset):
        from daemon.web.journal import parse_query
        return self.journal.search(parse_query(q), limit, offset)

    def output(self, row):
        return self.journal.get(row)

    def latest_output(self, pair, rel):
        return self.journal.latest_for(pair, rel)

    def review_items(self):
        return []

    def failed_files(self):
        return []

    def waiting_files(self):
        return []

    def models(self):
        return ["u2netp"]

    def roots(self, pair):
        if pair != "main":
            raise FileNotFoundError(pair)
        return self._roots

    def metrics(self):
        return b"", "text/plain"


def big_photo(width=6000, height=4000) -> bytes:
    """A 24 MP JPEG: a real photo (chelsea) upscaled, as a camera file stands in."""
    import skimage.data

    img = Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def measure_desk(n: int, requests: int, models: Path, touchups: int) -> list[str]:
    """The review desk: page and API over ``n`` journal rows (in-process server, real
    HTTP), the item view's previews of a 24 MP source, and the touch-up of it."""
    from daemon import config as configmod
    from daemon.cache.guard import CacheGuard
    from daemon.cache.sqlite import SqliteStore
    from daemon.coord.locks import open_locks
    from daemon.config.schema import WebConfig
    from daemon.fsutil import atomic_write_bytes
    from daemon.imaging.touchup import Stroke
    from daemon.inference.engine import Engines
    from daemon.pipeline import Pipeline, Plan
    from daemon.web.prefetch import Prefetcher
    from daemon.web.server import WebServer
    from daemon.web.thumbs import Thumbnails

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    work = Path(tempfile.mkdtemp(prefix="rembgd-desk-"))
    lines = []
    try:
        roots = {k: work / k for k in ("inbox", "outbox", "failed", "review")}
        for d in roots.values():
            d.mkdir()
        journal = Journal(work / "recent.sqlite", keep=max(n, 1))
        now = time.time() - n
        db = sqlite3.connect(work / "recent.sqlite")
        db.executemany(
            "INSERT INTO recent (time, pair, source_root, source_rel, outputs, tier, model, ms)"
            " VALUES (?, 'main', 'inbox', ?, ?, ?, 'u2netp', 420.0)",
            ((now + i, f"shoot{i // 100:04d}/img{i:06d}.jpg",
              json.dumps([f"shoot{i // 100:04d}/img{i:06d}.jpg.png"]),
              ("exact", "near", "miss")[i % 3]) for i in range(n)))
        db.commit()
        db.close()
        server = WebServer(WebConfig(), _DeskController(journal, roots),
                           Thumbnails(work / "thumbs"))
        port = int(server.start().rsplit(":", 1)[1].strip("/"))
        day = time.strftime("%Y-%m-%d", time.localtime(now + n / 2))
        paths = {"page": "/", "page, last page": f"/?offset={n - 24}",
                 "API newest 24": "/api/outputs", "API name search": "/api/outputs?q=img050000",
                 "API tier:miss": "/api/outputs?q=tier:miss",
                 f"API date:{day}": f"/api/outputs?q=date:{day}",
                 "API name past the newest 24, deep offset":
                     f"/api/outputs?q=shoot0&offset={n // 20}"}
        lines += [f"### Page and API, {n:,} outputs in the journal ({requests} requests each)",
                  "", "| request | median ms | p95 ms |", "|---|---:|---:|"]
        worst = 0.0
        for name, path in paths.items():
            for _ in range(3):
                timed_get(port, path)
            times = sorted(timed_get(port, path)[0] for _ in range(requests))
            assert timed_get(port, path)[1] == 200, path
            med, p95 = statistics.median(times), times[int(len(times) * 0.95) - 1]
            worst = max(worst, med)
            lines.append(f"| `{path}` ({name}) | {med:.1f} | {p95:.1f} |")
        server.stop()
        journal.close()
        lines += ["", f"target < {PAGE_TARGET_MS:.0f} ms: "
                      f"{'met' if worst < PAGE_TARGET_MS else 'NOT met'} (worst median "
                      f"{worst:.1f} ms)", ""]

        # the 24 MP source: its cutout, previews and touch-ups, with a real cache
        data = big_photo()
        (roots["inbox"] / "big.jpg").write_bytes(data)
        cfg = configmod.load(_desk_config(work, models))
        store = SqliteStore(cfg.cache.dir)
        guard = CacheGuard(cfg.store, cfg.cache, opener=lambda: store)
        pipe = Pipeline(Engines(models, threads=0), guard, open_locks(cfg.store, cfg.cache.dir),
                        cfg.cache, max_pixels=cfg.max_image_pixels)
        plan = Plan(cfg.output_defaults)
        t0 = time.perf_counter()
        rendered = pipe.render(data, plan)
        first_ms = (time.perf_counter() - t0) * 1000
        out = roots["outbox"] / "big.jpg.png"
        atomic_write_bytes(out, rendered.files[""])

        # first paint of its item view: the previews made at delivery by the prefetcher
        # (as the daemon's record listener queues them), then the item page's HTML and
        # the two previews over real HTTP, as the browser asks for them
        item_journal = Journal(work / "item.sqlite")
        item_journal.add(RecentOutput(time.time(), 0, "inbox", "big.jpg", ("big.jpg.png",),
                                      rendered.tier, "u2netp", first_ms))
        row = item_journal.last(1)[0].id
        thumbs, previews = Thumbnails(work / "thumbs2"), Thumbnails(work / "previews", 2048)
        prefetch = Prefetcher([previews, thumbs])
        prefetch.start()
        t0 = time.perf_counter()
        prefetch.want(roots["inbox"], Path("big.jpg"))
        prefetch.want(roots["outbox"], Path("big.jpg.png"))
        prefetch.wait_idle(300)
        ahead_ms = (time.perf_counter() - t0) * 1000
        prefetch.stop()
        server = WebServer(WebConfig(), _DeskController(item_journal, roots), thumbs, previews)
        port = int(server.start().rsplit(":", 1)[1].strip("/"))
        paints = []
        for _ in range(max(3, requests // 4)):
            steps = [timed_get(port, f"/item/o{row}"),
                     timed_get(port, "/preview?pair=0&root=inbox&path=big.jpg"),
                     timed_get(port, "/preview?pair=0&root=outbox&path=big.jpg.png")]
            assert all(st[1] == 200 for st in steps), [st[1] for st in steps]
            paints.append([st[0] for st in steps])
        server.stop()
        item_journal.close()
        first_paint = [sum(p) for p in paints]
        cold_previews = Thumbnails(work / "previews-cold", 2048)
        cold = []
        for name, root in (("big.jpg", roots["inbox"]), ("big.jpg.png", roots["outbox"])):
            t0 = time.perf_counter()
            cold_previews.get(root, Path(name))
            cold.append((time.perf_counter() - t0) * 1000)

        # touch-ups, interleaved: on the workbench (the source still decoded from the
        # touch-up before) and from the file (the workbench emptied first)
        first_touch = None
        warm_t, cold_t = [], []
        for i in range(touchups * 2 + 1):
            y = 1200 + 60 * i
            stroke = Stroke("remove", 40.0, ((2500.0, y), (3300.0, y + 80)))
            if i % 2 == 1:
                pipe.workbench.drop()
            t0 = time.perf_counter()
            touched = pipe.touch_up(data, plan, [stroke])
            atomic_write_bytes(out, touched.files[""])
            ms = (time.perf_counter() - t0) * 1000
            if i == 0:
                first_touch = ms  # no correction yet: the model's mask refined in full
            else:
                (cold_t if i % 2 == 1 else warm_t).append(ms)
        # the first touch-up of an item again (reverted), now as the item view makes it:
        # the brush picked prepares the source while the strokes are drawn
        pipe.forget_correction(data)
        t0 = time.perf_counter()
        pipe.prepare_touch_up(data, plan)
        prepare_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        touched = pipe.touch_up(data, plan, [Stroke("remove", 40.0, ((2500.0, 900.0),
                                                                      (3300.0, 980.0)))])
        atomic_write_bytes(out, touched.files[""])
        prepared_ms = (time.perf_counter() - t0) * 1000
        med, med_cold = statistics.median(warm_t), statistics.median(cold_t)
        paint = first_paint[0]  # the item's first view; then the browser's cache aside
        lines += ["### 24 MP source (6000 x 4000 JPEG), cache on, u2netp",
                  "", "| step | ms |", "|---|---:|",
                  f"| first render (miss: decode, inference, refine, PNG) | {first_ms:.0f} |",
                  f"| previews made ahead, in the background after delivery (source + cutout, "
                  f"2048 px WebP, and their thumbnails) | {ahead_ms:.0f} |",
                  f"| **item view first paint** (the item's first view: page HTML + source "
                  f"preview + cutout preview, served from the cache) | {paint:.1f} |",
                  f"| views again, median of {len(paints) - 1} | "
                  f"{statistics.median(first_paint[1:]):.1f} |",
                  f"| view runs, ms (HTML + source + cutout) | "
                  f"{', '.join(f'{p[0]:.1f}+{p[1]:.1f}+{p[2]:.1f}' for p in paints)} |",
                  f"| for comparison, previews made on first view (source + cutout) | "
                  f"{cold[0]:.0f} + {cold[1]:.0f} |",
                  f"| first touch-up of the item (model's mask refined in full, decode) | "
                  f"{first_touch:.0f} |",
                  f"| first touch-up after the brush was picked (prepared meanwhile, in "
                  f"{prepare_ms:.0f} ms: decode, fingerprint, model's mask refined) | "
                  f"{prepared_ms:.0f} |",
                  f"| **touch-up delivered** (source on the workbench: correction, refine "
                  f"in the strokes' box, PNG, atomic write), median of {len(warm_t)} | "
                  f"{med:.0f} |",
                  f"| touch-up from the file (workbench emptied: decode, fingerprint, "
                  f"correction decode too), median of {len(cold_t)}, interleaved | "
                  f"{med_cold:.0f} |",
                  f"| runs, workbench | {', '.join(f'{t:.0f}' for t in warm_t)} |",
                  f"| runs, from the file | {', '.join(f'{t:.0f}' for t in cold_t)} |", "",
                  f"target touch-up <= 2000 ms: {'met' if med <= 2000 else 'NOT met'} "
                  f"(workbench), {'met' if med_cold <= 2000 else 'NOT met'} (from the file); "
                  f"first paint <= 300 ms: {'met' if paint <= 300 else 'NOT met'}"]
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lines


def _desk_config(work: Path, models: Path) -> Path:
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "watch": [{"inbox": str(work / "inbox"), "outbox": str(work / "outbox")}],
        "models": {"dir": str(models)}, "cache": {"dir": str(work / "cache")}}))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--desk", type=int, default=0, metavar="N",
                    help="instead: the review desk (page and API over N journal rows, "
                         "previews and touch-up of a 24 MP source)")
    ap.add_argument("--touchups", type=int, default=5)
    ap.add_argument("--outputs", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--cache-entries", type=int, default=200_000,
                    help="rows in the cache index (the default cache.limits.max_entries)")
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    args, _unknown = ap.parse_known_args(argv)
    if args.desk:
        table = "\n".join(measure_desk(args.desk, args.requests, args.models, args.touchups))
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
        return 0
    rows = [measure(n, args.requests, args.models, args.cache_entries) for n in args.outputs]
    lines = [f"cache index: {rows[0]['cache_entries']:,} entries; {args.requests} requests "
             "each; times from connect to the last byte", "",
             "| outputs in journal + outbox | page median ms | page p95 ms | page KiB | "
             "/metrics median ms | /metrics p95 ms | thumbnail first ms | thumbnail cached ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['outputs']:,} | {r['page_median']:.1f} | {r['page_p95']:.1f} | "
                     f"{r['page_kb']:.0f} | {r['metrics_median']:.1f} | {r['metrics_p95']:.1f}"
                     f" | {r['thumb_first']:.1f} | {r['thumb_cached']:.1f} |")
    big = rows[-1]
    ok = big["page_median"] < PAGE_TARGET_MS and big["metrics_median"] < METRICS_TARGET_MS
    lines.append("")
    lines.append(f"targets ({big['outputs']:,} outputs): page < {PAGE_TARGET_MS:.0f} ms, "
                 f"/metrics < {METRICS_TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
