"""Cache maintenance on any backend, through the Store Protocol: stats, clear, verify,
bulk load.

Library code: it returns data; ``daemon.cli.cache`` prints it.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import time
from collections import Counter
from typing import Any, Callable, Iterable

from daemon.cache.base import Entry, Tier
from daemon.cache.policy import Rec, estimate_blob_sizes, policy_order, slim
from daemon.config import CacheConfig, StoreConfig

BATCH_IDS = 200
SHOW = 5  # rows in the oldest / coldest lists


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _batches(ids: list[str], size: int = BATCH_IDS) -> Iterable[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def delete_ids(store, ids: list[str], pause_s: float = 0.005) -> int:
    """Delete in batches of at most BATCH_IDS, pausing between them (a daemon may be busy)."""
    n = 0
    for batch in _batches(ids):
        n += store.delete(batch)
        time.sleep(pause_s)
    return n


def bulk_load(store, rows: Iterable[tuple[Entry, bytes | None]], batch: int = 1000) -> int:
    """Seed a store with ``(entry, mask blob)`` rows, ``batch`` at a time (one transaction or
    pipeline each): for benchmarks and tests. Entries keep their ids, times and hits. A None
    blob writes none: SQLite's lookups still find the entry, Redis's treat it as missing."""
    rows, n = iter(rows), 0
    while chunk := list(itertools.islice(rows, batch)):
        store.restore_many([e for e, _ in chunk], [b for _, b in chunk if b is not None])
        n += len(chunk)
    return n


def _rec_json(r: Rec) -> dict:
    return {"id": r.id, "model": r.model, "created": iso(r.created),
            "last_hit": iso(r.last_hit), "hits": r.hits, "bytes": r.nbytes,
            "alias_of": r.origin}


# -------------------------------------------------------------------- stats


def stats(store, store_cfg: StoreConfig, cache: CacheConfig, window_hours: float = 24.0, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    store.flush()
    recs: list[Rec] = []
    keys: Counter = Counter()
    for e in store.entries():
        recs.append(Rec.of(e))
        keys[e.key] += 1
    models: dict[str, dict[str, int]] = {}
    for r in recs:
        m = models.setdefault(r.model, {"entries": 0, "bytes": 0})
        m["entries"] += 1
        m["bytes"] += r.nbytes
    total = store.total_bytes()
    tiers = store.tier_counts(now - window_hours * 3600)
    lookups = sum(tiers.values())
    hits = lookups - tiers.get(Tier.MISS, 0)
    limits = cache.limits
    return {
        "backend": store_cfg.backend,
        "location": store_cfg.url if store_cfg.backend == "redis" else str(cache.dir),
        "entries": store.count(),
        "aliases": sum(1 for r in recs if r.origin),
        "bytes": total,  # as the store counts it (the cheap limit check uses this)
        "blob_bytes": sum(estimate_blob_sizes(  # distinct blobs
            recs, resolve=lambda d: len(store.get_blob(d) or b"")).values()),
        "keys": len(keys),  # distinct model + option combinations
        "limits": {"max_entries": limits.max_entries, "max_bytes": limits.max_bytes,
                   "ttl_days": limits.ttl_days, "policy": limits.policy},
        "window_hours": window_hours,
        "lookups": lookups,
        "hit_rate": round(hits / lookups, 4) if lookups else None,
        "tiers": {t: {"count": n, "rate": round(n / lookups, 4) if lookups else None}
                  for t, n in tiers.items()},
        "oldest": [_rec_json(r) for r in sorted(recs, key=lambda r: (r.created, r.id))[:SHOW]],
        "coldest": [_rec_json(r) for r in policy_order(recs, limits.policy, now)[:SHOW]],
        "models": dict(sorted(models.items())),
    }


# -------------------------------------------------------------- clear / verify


def clear(store, model: str | None = None) -> int:
    ids = [e.id for e in store.entries() if model is None or e.model == model]
    return delete_ids(store, ids)


def verify(store, repair: bool = False, *,
           kept: Callable[[str], bool] = lambda digest: False) -> dict:
    """Rows whose blobs are missing or corrupt, and blobs no row references.

    "missing": the digest is not among ``store.blob_digests()``; "corrupt": it
    is, but ``store.get_blob`` (which checks the sha256) returns None. Reads
    every referenced blob once. ``kept(digest)``: an unreferenced blob a healed
    index kept on purpose (``SqliteStore.kept_by_heal``): reported as kept, not as a
    problem, and never deleted. No blob says which key and fingerprints it was
    stored under, so none can be indexed again from its bytes; a kept one is
    reused when the same mask or output is stored again. With ``repair``: bad
    rows are deleted (the store then drops blobs nothing references), and the
    other orphan blobs that are still unreferenced on a second look (a live
    daemon writes a blob just before its row) are deleted.
    """
    store.flush()
    recs = slim(store.entries())
    present = set(store.blob_digests())
    users: dict[str, list[str]] = {}
    for r in recs:
        for d in r.digests():
            users.setdefault(d, []).append(r.id)
    missing = sorted(d for d in users if d not in present)
    corrupt = sorted(d for d in users if d in present and store.get_blob(d) is None)
    unreferenced = present - set(users)
    kept_blobs = sorted(d for d in unreferenced if kept(d))
    orphans = sorted(unreferenced - set(kept_blobs))
    bad_rows = sorted({i for d in missing + corrupt for i in users[d]})
    ids = {r.id for r in recs}
    report: dict[str, Any] = {
        "rows": len(recs), "blobs": len(present),
        "missing_blobs": missing, "corrupt_blobs": corrupt, "orphan_blobs": orphans,
        "kept_blobs": kept_blobs,
        "bad_rows": bad_rows,
        "aliases_without_origin": sum(1 for r in recs if r.origin and r.origin not in ids),
        "problems": len(missing) + len(corrupt) + len(orphans),
        "repaired": False, "deleted_rows": 0, "deleted_blobs": 0,
    }
    if repair and report["problems"]:
        report["deleted_rows"] = delete_ids(store, bad_rows)
        still_used = {d for r in slim(store.entries()) for d in r.digests()}
        for d in orphans:
            if d not in still_used:
                store.delete_blob(d)
                report["deleted_blobs"] += 1
        report["repaired"] = True
    return report
