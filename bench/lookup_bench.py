"""Lookup latency of the store backends at 100,000 entries; writes bench/lookup.md.

Each backend is filled with N synthetic entries: random 256-bit pHashes,
real-sized thumbnails (Thumbs.NBYTES) and float16 embeddings (1280-d) drawn from a pool
of 64, a small unique fake mask blob each. Then Q queries per kind are timed one by one:

* ``find_exact`` / ``find_pixel`` of stored hashes (hits) and of new ones (misses);
* ``find_near`` (radius 10) for codes 0-10 bits from a stored code (recall is
  checked: the stored entry must come back) and for random codes (no neighbours);
* for Redis also ``find_exact`` with a warm local tier (the same 200 hashes again),
  and for reference an in-process numpy brute-force Hamming scan over all codes.

Usage: python bench/lookup_bench.py [--n 100000] [--queries 1000] [--backends sqlite,redis]
Redis: REMBGD_TEST_REDIS or redis://127.0.0.1:6379/0; a unique prefix, removed afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon import config as configmod  # noqa: E402
from daemon.imaging.fingerprint import EMBED_DIM, Fingerprint, Thumbs  # noqa: E402
from daemon.cache.base import Entry  # noqa: E402
from daemon.cache.maintenance import bulk_load  # noqa: E402

KEY = hashlib.sha256(b"bench-cache-key").hexdigest()[:32]
THUMB_BYTES = Thumbs.NBYTES  # the real layout, whatever LUMA_SIZE / AB_SIZE are
BATCH = 1000
RADIUS = 10


# ------------------------------------------------------------ synthetic data


POOL = 64  # distinct thumbnails / embeddings: their size matters to a lookup, not their content


class Synth:
    """Deterministic synthetic entries; pHashes, hashes and mask blobs are unique per entry."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        emb = rng.standard_normal((POOL, EMBED_DIM), dtype=np.float32)
        self.embeddings = list(emb / np.linalg.norm(emb, axis=1, keepdims=True))
        self.thumbs = [Thumbs.from_bytes(rng.bytes(THUMB_BYTES)) for _ in range(POOL)]
        assert all(t.valid and len(t.to_bytes()) == THUMB_BYTES for t in self.thumbs)

    def batch(self, codes: np.ndarray) -> list[tuple[Entry, bytes]]:
        rng, now, out = self.rng, time.time(), []
        picks = rng.integers(0, POOL, size=(len(codes), 2))
        for i, code in enumerate(codes):
            mask = rng.bytes(16) * 12  # 192 bytes, unique
            fp = Fingerprint(sha256=rng.bytes(32).hex(), pixel_hash=rng.bytes(20).hex(),
                             phash=code.tobytes(), width=1600, height=1200,
                             thumbs=self.thumbs[picks[i, 0]], embedding=self.embeddings[picks[i, 1]])
            created = now - float(rng.uniform(0, 30 * 86400))
            out.append((Entry(id=uuid.uuid4().hex, key=KEY, model="u2netp", fp=fp,
                              mask_digest=hashlib.sha256(mask).hexdigest(), output_digest=None,
                              nbytes=len(mask), created=created, last_hit=created, hits=0), mask))
        return out


def flip_random(rng: np.random.Generator, code: np.ndarray, d: int) -> bytes:
    bits = np.unpackbits(code).copy()
    if d:
        bits[rng.choice(256, size=d, replace=False)] ^= 1
    return np.packbits(bits).tobytes()


# ------------------------------------------------------------------ timing

_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)



def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def timed(fn, args_list) -> tuple[dict[str, float], list]:
    samples, results = [], []
    for args in args_list:
        t0 = time.perf_counter()
        r = fn(*args)
        samples.append(time.perf_counter() - t0)
        results.append(r)
    return stats(samples), results


def run_backend(name: str, store, n: int, q: int, seed: int, extra, blobs: bool) -> dict:
    """Fill ``store`` through ``bulk_load`` (with the mask blobs if ``blobs``), time queries."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    synth = Synth(rng)
    shas, pixels, ids = [], [], []
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        batch = synth.batch(codes[start:start + BATCH])
        bulk_load(store, ((e, mask if blobs else None) for e, mask in batch), BATCH)
        shas += [e.fp.sha256 for e, _ in batch]
        pixels += [e.fp.pixel_hash for e, _ in batch]
        ids += [e.id for e, _ in batch]
        if (start // BATCH) % 20 == 0:
            say(f"{name}: {start + len(batch):,} / {n:,} entries")
    fill_s = time.perf_counter() - t0
    assert store.count() == n, store.count()

    qrng = np.random.default_rng(seed + 1)
    pick = qrng.integers(0, n, size=q)
    res: dict = {"fill_s": fill_s, "rows": {}}
    rows = res["rows"]

    say(f"{name}: filled in {fill_s:.0f} s; timing queries")
    for i in pick[:50]:  # warm-up: connections, scripts, page cache
        store.find_exact(KEY, shas[i])
        store.find_near(KEY, codes[i].tobytes(), RADIUS)

    rows["find_exact hit"], got = timed(store.find_exact, [(KEY, shas[i]) for i in pick])
    assert all(e is not None and e.id == ids[i] for e, i in zip(got, pick))
    rows["find_exact miss"], got = timed(store.find_exact,
                                         [(KEY, qrng.bytes(32).hex()) for _ in range(q)])
    assert all(e is None for e in got)
    rows["find_pixel hit"], got = timed(store.find_pixel, [(KEY, pixels[i]) for i in pick])
    assert all(e is not None and e.id == ids[i] for e, i in zip(got, pick))

    dists = qrng.integers(0, RADIUS + 1, size=q)
    near_q = [(KEY, flip_random(qrng, codes[i], int(d)), RADIUS) for i, d in zip(pick, dists)]
    rows["find_near d=0-10 (r=10)"], got = timed(store.find_near, near_q)
    recall = np.mean([ids[i] in {e.id for e in r} for r, i in zip(got, pick)])
    res["near_recall"] = float(recall)
    res["near_mean_results"] = float(np.mean([len(r) for r in got]))
    rand_q = [(KEY, qrng.integers(0, 256, 32, dtype=np.uint8).tobytes(), RADIUS)
              for _ in range(q)]
    rows["find_near random (r=10)"], got = timed(store.find_near, rand_q)
    res["random_nonempty"] = int(sum(1 for r in got if r))

    if name == "redis":
        warm = [(KEY, shas[i]) for i in pick[:min(200, q)]]
        timed(store.find_exact, warm)
        rows["find_exact hit, local tier warm"], _ = timed(store.find_exact,
                                                           warm * max(1, q // len(warm)))
    say(f"{name}: queries done")
    res.update(extra(store))
    return res


# --------------------------------------------------------------- backends


def bench_sqlite(n: int, q: int, seed: int) -> dict:
    from daemon.cache.sqlite import SqliteStore

    tmp = Path(tempfile.mkdtemp(prefix="rembgd-bench-"))
    try:
        store = SqliteStore(tmp / "cache")

        def extra(s):
            size = sum(p.stat().st_size for p in s.dir.glob("index.sqlite3*"))
            return {"footprint": f"index.sqlite3 (+ WAL) {size / 1e6:,.0f} MB = "
                                 f"{size / n:,.0f} B/entry, without blob files"}

        # no blob files: SQLite's lookups never read them, and 100,000 small files cost
        # minutes to create and delete on a disk mounted with `discard`
        res = run_backend("sqlite", store, n, q, seed, extra, blobs=False)
        store.close()
        return res
    finally:
        say("sqlite: removing the bench files")
        shutil.rmtree(tmp, ignore_errors=True)
        say("sqlite: cleaned up")


def bench_redis(n: int, q: int, seed: int, url: str) -> dict:
    import redis

    from daemon.cache.redis import RedisStore

    prefix = f"rembgd-bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="rembgd-bench-"))
    cfg = configmod.parse({"store": {"backend": "redis", "url": url, "prefix": prefix},
                           "cache": {"dir": str(tmp / "cache")}},
                          tmp / "config.yaml", check_folders=False)
    raw = redis.Redis.from_url(url)
    store = RedisStore(cfg.store, cfg.cache)

    def extra(s):
        return {"redis_version": raw.info("server")["redis_version"]}

    try:
        res = run_backend("redis", store, n, q, seed, extra, blobs=True)
    finally:
        store.close()
        say("redis: measuring (MEMORY USAGE of every 10th key) and removing the bench keys")
        by_kind: dict[str, list[int]] = {}
        batch: list[bytes] = []

        def drop(keys: list[bytes]) -> None:
            sample = keys[::10]
            with raw.pipeline(transaction=False) as pipe:
                for k in sample:
                    pipe.memory_usage(k, samples=0)
                for k, used in zip(sample, pipe.execute()):
                    kind = k.decode()[len(prefix) + 4:].split(":")[0]
                    by_kind.setdefault(kind, [0, 0])
                    by_kind[kind][0] += 10 * int(used or 0)
                    by_kind[kind][1] += 10
            raw.unlink(*keys)

        for k in raw.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(k)
            if len(batch) >= 5000:
                drop(batch)
                batch = []
        if batch:
            drop(batch)
        shutil.rmtree(tmp, ignore_errors=True)
        say("redis: cleaned up")
    total = sum(v[0] for v in by_kind.values())
    parts = ", ".join(f"{k} {v[0] / n:,.0f}" for k, v in
                      sorted(by_kind.items(), key=lambda kv: -kv[1][0]) if v[0] / n >= 50)
    res["footprint"] = (f"MEMORY USAGE (sampled 1/10) {total / 1e6:,.0f} MB = {total / n:,.0f} "
                        f"B/entry, incl. blobs: {parts}")
    return res


def bench_numpy(n: int, q: int, seed: int) -> dict:
    """Reference: brute-force Hamming distance over all codes in process memory."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    words = codes.view(np.uint64)  # 4 x 64 bits per code
    qrng = np.random.default_rng(seed + 1)
    pick = qrng.integers(0, n, size=q)

    def near(code: bytes, radius: int) -> np.ndarray:
        c = np.bitwise_count(words ^ np.frombuffer(code, np.uint64))
        d = c[:, 0] + c[:, 1] + c[:, 2] + c[:, 3]  # faster than .sum(axis=1) on 4 columns
        hit = np.flatnonzero(d <= radius)
        return hit[np.argsort(d[hit], kind="stable")][:16]

    queries = [(flip_random(qrng, codes[i], int(qrng.integers(0, RADIUS + 1))), RADIUS)
               for i in pick]
    row, _ = timed(near, queries)
    return {"rows": {f"numpy brute force over {n:,} codes (reference)": row}}


# ---------------------------------------------------------------- report


def write_report(path: Path, n: int, q: int, results: dict, total_s: float,
                 load: tuple[float, float]) -> None:
    lines = [
        "# Store lookup latency",
        "",
        f"`bench/lookup_bench.py --n {n} --queries {q}`: {n:,} synthetic entries per backend "
        f"(random 256-bit pHashes, real-sized {THUMB_BYTES:,}-byte thumbnails and 1280-d float16 "
        "embeddings, "
        "a 192-byte fake mask blob each; SQLite gets no blob files, its lookups never "
        "read them), one cache key. "
        f"{q:,} queries per row, timed one at a time from one thread (milliseconds).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
        + (f", Redis {results['redis']['redis_version']} on localhost (TCP)"
           if "redis" in results else "") + f". Whole run: {total_s:.0f} s; 1-minute load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other work shared "
        "the machine).",
        "",
        "| backend | query | p50 | p95 | p99 | mean |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend, res in results.items():
        for query, s in res["rows"].items():
            lines.append(f"| {backend} | {query} | {s['p50']:.3f} | {s['p95']:.3f} | "
                         f"{s['p99']:.3f} | {s['mean']:.3f} |")
    lines += ["", "| backend | fill (`bulk_load`) | footprint | near recall (d ≤ 10) | "
              "mean near results | random codes with a neighbour |", "|---|---:|---|---:|---:|---:|"]
    for backend, res in results.items():
        if "fill_s" not in res:
            continue
        lines.append(f"| {backend} | {res['fill_s']:.0f} s ({n / res['fill_s']:,.0f}/s) | "
                     f"{res['footprint']} | {res['near_recall']:.3f} | "
                     f"{res['near_mean_results']:.2f} | {res['random_nonempty']} / {q} |")
    lines += ["", "## Reading it", "", NOTES]
    path.write_text("\n".join(lines) + "\n")


NOTES = """\
* Every lookup costs well under the work it saves (decode + fingerprint take tens
  of milliseconds, inference 250-500 ms), so neither backend needs a faster index
  at this scale. Random pHashes spread evenly: each of the 16 bands matches about
  N / 65,536 stored codes, so a near query checks about 25 candidates. Real photo
  sets cluster more, which raises the candidate count in both backends.
* Redis pays a localhost round trip per call. An exact/pixel lookup is one Lua
  script: it checks the index, checks that the entry and its mask blob exist, and
  returns the entry. A near lookup is two scripts: the band union plus the
  candidates' pHashes, then the winners' entries. Most of a hit is moving and
  decoding the ~21 KB of thumbnails and embedding. With a warm local tier the
  script only confirms the id, and the entry comes from process memory, which
  about halves the p50 of a hit.
* SQLite runs in process: a near lookup is a 16-way UNION over indexed band
  columns. Its 4-5 ms p95/p99 tails, also seen in some Redis rows, match one
  scheduler time slice on a loaded 2-core machine (see the load average): most
  likely preemption, not the store. Rerun on an idle machine to measure tails.
* Memory: a Redis entry costs about as much as a SQLite row (the payload
  dominates both). The 16 band sets add ~3 KB per entry in Redis.
* The numpy row is DESIGN.md's brute-force alternative (all codes in memory, no
  index), included for scale. At 100k codes it is slower than both banded
  indexes, and every process would have to keep all the codes.
* Recall 1.000 is expected: 16 bands of 16 bits give exact recall up to radius 15.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "lookup.md")
    ap.add_argument("--redis", default=os.environ.get("REMBGD_TEST_REDIS",
                                                      "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    results = {}
    for backend in args.backends.split(","):
        say(f"{backend}: filling {args.n:,} entries")
        if backend == "sqlite":
            results["sqlite"] = bench_sqlite(args.n, args.queries, args.seed)
        elif backend == "redis":
            results["redis"] = bench_redis(args.n, args.queries, args.seed, args.redis)
        else:
            ap.error(f"unknown backend {backend}")
    results["numpy"] = bench_numpy(args.n, args.queries, args.seed)
    total = time.perf_counter() - t0
    load = (load_before[0], os.getloadavg()[0])
    write_report(args.out, args.n, args.queries, results, total, load)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
