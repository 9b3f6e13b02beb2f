"""Replay a skewed request stream against the real eviction policies.

Each request is an image id drawn Zipf-like (p(rank) ~ 1/rank**s) from
``--ids`` distinct ids. A hit bumps the entry's ``hits`` and ``last_hit`` (as
``store.record`` + ``flush`` do); a miss inserts an entry (as the pipeline
does after inference) and, when the cache holds more than ``--cap`` entries,
``daemon.cache.policy.plan_prune`` with ``CacheLimits(max_entries=cap, policy=...)``
picks the victims, exactly as ``Pruner.run`` would. One request per simulated
second; TTL and byte limits are off. No images are needed.

Workloads:
* ``static``: one fixed Zipf popularity ranking (the issue's workload);
* ``shifting``: the ranking is re-drawn every ``--shift`` requests, like a
  studio moving on to a new shoot (yesterday's hot images go cold).

Reference rows: Belady's OPT (evicts the entry whose next request is
farthest; an upper bound for any policy) and the compulsory-miss ceiling.

    .venv/bin/python bench/prune_policy.py            # writes bench/prune_policy.md
"""
from __future__ import annotations

import argparse
import heapq
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.config import POLICIES, CacheLimits  # noqa: E402
from daemon.cache.policy import Rec, plan_prune  # noqa: E402


def workload(n_ids: int, n_req: int, s: float, seed: int, shift: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_ids + 1) ** s
    p /= p.sum()
    ranks = rng.choice(n_ids, size=n_req, p=p)
    reqs = np.empty(n_req, dtype=np.int64)
    step = shift or n_req
    for k in range(0, n_req, step):
        perm = rng.permutation(n_ids)  # rank -> id, re-drawn per phase
        reqs[k:k + step] = perm[ranks[k:k + step]]
    return reqs


def simulate(reqs: np.ndarray, cap: int, policy: str, low_water: float) -> dict:
    limits = CacheLimits(max_bytes=0, max_entries=cap, ttl_days=0, policy=policy,
                         low_water=low_water)
    cache: dict[int, Rec] = {}
    hits = prunes = 0
    plan_s = 0.0
    for t, i in enumerate(reqs.tolist()):
        now = float(t)
        r = cache.get(i)
        if r is not None:
            hits += 1
            r.hits += 1
            r.last_hit = now
            continue
        cache[i] = Rec(i, "u2netp", f"m{i}", f"o{i}", 60_000, now, now, 0)
        if len(cache) > cap:
            t0 = time.perf_counter()
            plan = plan_prune(cache.values(), limits, now)
            plan_s += time.perf_counter() - t0
            prunes += 1
            for v in plan.victims:
                del cache[v.id]
    return {"hit_rate": hits / len(reqs), "prunes": prunes,
            "plan_ms": 1000 * plan_s / max(prunes, 1)}


def belady(reqs: np.ndarray, cap: int) -> float:
    """Hit rate of OPT: on a miss with a full cache, drop the entry used farthest ahead."""
    reqs = reqs.tolist()
    nxt = [0] * len(reqs)
    seen: dict[int, int] = {}
    for t in range(len(reqs) - 1, -1, -1):
        nxt[t] = seen.get(reqs[t], 1 << 60)
        seen[reqs[t]] = t
    cache: dict[int, int] = {}  # id -> next use
    heap: list[tuple[int, int]] = []  # (-next use, id), lazily invalidated
    hits = 0
    for t, i in enumerate(reqs):
        if i in cache:
            hits += 1
        elif len(cache) >= cap:
            while True:
                neg, j = heapq.heappop(heap)
                if cache.get(j) == -neg:
                    break
            if -neg > nxt[t]:
                del cache[j]
            else:  # the new entry is the one needed farthest ahead: it goes at once
                heapq.heappush(heap, (neg, j))
                continue
        cache[i] = nxt[t]
        heapq.heappush(heap, (-nxt[t], i))
    return hits / len(reqs)


def run_one(job: tuple) -> tuple:
    wl, seed, policy, a = job
    reqs = workload(a["ids"], a["requests"], a["zipf"], seed, a["shift"] if wl == "shifting" else 0)
    if policy == "OPT":
        return wl, seed, policy, {"hit_rate": belady(reqs, a["cap"])}
    if policy == "ceiling":
        first = len(set(reqs.tolist()))
        return wl, seed, policy, {"hit_rate": 1 - first / len(reqs)}
    return wl, seed, policy, simulate(reqs, a["cap"], policy, a["low_water"])


def plan_cost(n: int, policy: str, seed: int = 0) -> float:
    """Seconds for one plan over ``n`` entries (the daemon's default max_entries is 200k)."""
    rng = np.random.default_rng(seed)
    created = rng.uniform(0, 1e7, n)
    recs = [Rec(f"{k:032x}", "u2netp", f"m{k}", f"o{k}", 60_000, float(c),
                float(c + rng.uniform(0, 1e6)), int(rng.zipf(1.5)) - 1)
            for k, c in enumerate(created)]
    limits = CacheLimits(max_bytes=0, max_entries=int(n * 0.95), ttl_days=0, policy=policy)
    t0 = time.perf_counter()
    plan_prune(recs, limits, 1.2e7)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ids", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--cap", type=int, default=300)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--shift", type=int, default=5000, help="requests per phase (shifting)")
    ap.add_argument("--low-water", type=float, default=1.0,
                    help="prune to this fraction of the cap (1.0: strictly at the cap)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "prune_policy.md")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    params = {"ids": a.ids, "requests": a.requests, "zipf": a.zipf, "cap": a.cap,
              "shift": a.shift, "low_water": a.low_water}
    rows = list(POLICIES) + ["OPT", "ceiling"]
    jobs = [(wl, s, p, params) for wl in ("static", "shifting") for p in rows for s in seeds]
    t0 = time.time()
    with ProcessPoolExecutor(a.jobs) as ex:
        results = list(ex.map(run_one, jobs))
    wall = time.time() - t0
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for wl, s, p, res in results:
        table.setdefault((wl, p), {})[s] = res

    cmd = "python bench/prune_policy.py " + " ".join(sys.argv[1:])
    out = [
        "# Cache eviction policies under a skewed workload",
        "",
        f"Generated by `{cmd.strip()}` in {wall:.0f} s on {platform.machine()} "
        f"({platform.python_implementation()} {platform.python_version()}); "
        "victims chosen by the real `daemon.cache.policy.plan_prune`.",
        "",
        f"- {a.ids:,} distinct image ids, {a.requests:,} requests, Zipf-like reuse "
        f"p(rank) ~ 1/rank^{a.zipf:g} (numpy `default_rng(seed)`), seeds {a.seeds}.",
        f"- Cache capped at {a.cap} entries: after each insert that makes it {a.cap + 1}, "
        f"prune to {int(a.cap * a.low_water)} (`low_water={a.low_water:g}`); TTL and byte "
        "limits off.",
        f"- `static`: one popularity ranking. `shifting`: the ranking is re-drawn every "
        f"{a.shift:,} requests (a new shoot; yesterday's hot images go cold).",
        "- `OPT` is Belady's offline optimum (an upper bound for any policy); `ceiling` is "
        "1 - compulsory misses (first requests) / requests.",
        "",
    ]
    for wl in ("static", "shifting"):
        out += [f"## {wl}", "",
                "| policy | hit rate (mean) | " + " | ".join(f"seed {s}" for s in seeds)
                + " | vs lru | plan ms/prune |",
                "|---|---|" + "---|" * len(seeds) + "---|---|"]
        base = statistics.mean(table[(wl, "lru")][s]["hit_rate"] for s in seeds)
        for p in rows:
            per = table[(wl, p)]
            rates = [per[s]["hit_rate"] for s in seeds]
            mean = statistics.mean(rates)
            delta = f"{100 * (mean - base):+.2f} pt" if p in POLICIES else ""
            ms = (f"{statistics.mean(per[s]['plan_ms'] for s in seeds):.2f}"
                  if "plan_ms" in per[seeds[0]] else "")
            out.append(f"| {p} | **{mean:.4f}** | " + " | ".join(f"{r:.4f}" for r in rates)
                       + f" | {delta} | {ms} |")
        out.append("")
    out += ["## Plan cost at the default `max_entries` (200,000 entries, one plan)", "",
            "| policy | seconds |", "|---|---|"]
    for p in POLICIES:
        out.append(f"| {p} | {plan_cost(200_000, p):.2f} |")
    out.append("")
    text = "\n".join(out)
    print(text)
    if a.out:
        prev = a.out.read_text() if a.out.exists() else ""
        marker = "<!-- notes -->"
        notes = prev[prev.index(marker):] if marker in prev else marker + "\n"
        a.out.write_text(text + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
