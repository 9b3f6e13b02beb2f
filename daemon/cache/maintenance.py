"""``rembgd cache stats | prune | clear | verify | export | import``.

Everything goes through the ``Store`` Protocol, so it works on every backend.

Archive format (``export``/``import``), a zip file:

* ``blobs/<sha256>``: each blob (mask and output PNGs) once, stored as is;
* ``entries.jsonl``: one JSON object per entry; binary fields (pHash,
  thumbnails, float16 embedding) are base64; times and hit counts kept;
* ``manifest.json``: ``format``, ``schema_version``, counts, the models, the
  rembgd version. Zip has a central directory, so ``import`` reads the
  manifest first and refuses an unknown format or a newer schema.

Import verifies every blob's sha256 before ``store.put_blob``, writes blobs
before rows (``store.restore``), and skips an entry whose (key, sha256) the
store already has, so importing twice, or into a populated cache, adds nothing
twice and never overwrites local hit data.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from daemon.config import Config
from daemon.cache.prune import Pruner, Rec, estimate_blob_sizes, policy_order, slim

ARCHIVE_FORMAT = "rembgd-cache"
ARCHIVE_SCHEMA = 1
BATCH_IDS = 200
SHOW = 5  # rows in the oldest / coldest lists


def run_cache_command(args, cfg: Config) -> int:
    from daemon.cache import open_store

    command = args.cache_command
    try:
        store = open_store(cfg)
    except Exception as exc:  # corrupt index, unreachable Redis, unwritable dir
        print(f"rembgd: cannot open the cache ({cfg.store.backend}): "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        if command == "stats":
            data = stats(store, cfg, getattr(args, "window_hours", 24.0))
            if getattr(args, "json", False):
                print(json.dumps(data, indent=2))
            else:
                print_stats(data)
            return 0
        if command == "prune":
            return cmd_prune(store, cfg, getattr(args, "dry_run", False))
        if command == "clear":
            n = clear(store, getattr(args, "model", None))
            which = f"of model {args.model} " if getattr(args, "model", None) else ""
            print(f"cleared {n} entries {which}".rstrip())
            return 0
        if command == "verify":
            report = verify(store, repair=getattr(args, "repair", False))
            print_verify(report)
            return 1 if report["problems"] and not report["repaired"] else 0
        if command == "export":
            res = export_archive(store, args.archive)
            print(f"exported {res['entries']} entries and {res['blobs']} blobs "
                  f"({_size(res['bytes'])}) to {args.archive}"
                  + (f"; skipped {res['skipped_entries']} entries with unreadable blobs"
                     if res["skipped_entries"] else ""))
            return 0
        if command == "import":
            try:
                res = import_archive(store, args.archive, current_keys=_current_keys(cfg))
            except ArchiveError as exc:
                print(f"rembgd: {exc}", file=sys.stderr)
                return 1
            print_import(res, args.archive)
            return 1 if res["bad_blobs"] or res["malformed"] else 0
    finally:
        store.close()
    print(f"rembgd: unknown cache command {command!r}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ helpers


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


def _current_keys(cfg: Config) -> set[str] | None:
    """Cache keys of the configured output options (None if a model is not installed).

    Imports rembg (via ``render``): about 3 s, so only ``import`` uses it.
    """
    from daemon.inference import models
    from daemon.imaging.render import cache_key

    keys = set()
    try:
        for opts in {p.options for p in cfg.watch} | {cfg.output_defaults}:
            md5 = models.checked_mask_model(cfg.models_dir, opts.model).md5
            keys.add(cache_key(opts, md5))
    except Exception:
        return None
    return keys


def _rec_json(r: Rec) -> dict:
    return {"id": r.id, "model": r.model, "created": _iso(r.created),
            "last_hit": _iso(r.last_hit), "hits": r.hits, "bytes": r.nbytes,
            "alias_of": r.origin}


# -------------------------------------------------------------------- stats


def stats(store, cfg: Config, window_hours: float = 24.0, now: float | None = None) -> dict:
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
    hits = lookups - tiers.get("miss", 0)
    limits = cfg.cache.limits
    return {
        "backend": cfg.store.backend,
        "location": cfg.store.url if cfg.store.backend == "redis" else str(cfg.cache.dir),
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


def print_stats(d: dict) -> None:
    lim = d["limits"]
    print(f"cache      {d['backend']} at {d['location']}")
    print(f"entries    {d['entries']} ({d['aliases']} aliases)"
          + (f" of {lim['max_entries']}" if lim["max_entries"] else ""))
    print(f"bytes      {_size(d['bytes'])}" + (f" of {_size(lim['max_bytes'])}" if lim["max_bytes"]
                                               else "")
          + f" (distinct blobs {_size(d['blob_bytes'])})")
    if d["keys"] > 1:
        print(f"keys       {d['keys']} model/option combinations (only the configured ones hit)")
    if d["lookups"]:
        tiers = ", ".join(f"{t} {v['count']} ({100 * v['rate']:.1f}%)"
                          for t, v in d["tiers"].items())
        print(f"last {d['window_hours']:g} h  {d['lookups']} lookups, hit rate "
              f"{100 * d['hit_rate']:.1f}%: {tiers}")
    else:
        print(f"last {d['window_hours']:g} h  no lookups")
    for m, v in d["models"].items():
        print(f"model      {m}: {v['entries']} entries, {_size(v['bytes'])}")
    for title, rows in (("oldest", d["oldest"]), (f"coldest ({lim['policy']})", d["coldest"])):
        if rows:
            print(f"{title}:")
            for r in rows:
                print(f"  {r['id'][:12]}  {r['model']:<10} created {r['created']}  "
                      f"last hit {r['last_hit']}  hits {r['hits']}"
                      + (f"  alias of {r['alias_of'][:12]}" if r["alias_of"] else ""))


# -------------------------------------------------------------- prune/clear


def cmd_prune(store, cfg: Config, dry_run: bool) -> int:
    import structlog

    pruner = Pruner(store, cfg.cache.limits, cfg.cache.prune, structlog.get_logger("rembgd.prune"))
    rep = pruner.run(dry_run=dry_run)
    if rep.skipped:
        print(f"not pruned: {rep.skipped}", file=sys.stderr)
        return 1
    verb = "would remove" if dry_run else "removed"
    removed = sum(v["entries"] for v in rep.removed.values())
    freed = sum(v["bytes"] for v in rep.removed.values())
    print(f"{verb} {removed} of {rep.entries_before} entries, {_size(freed)} "
          f"(policy {rep.policy}); {rep.entries_after} entries, {_size(rep.bytes_after)} left")
    for reason, v in rep.removed.items():
        if v["entries"]:
            print(f"  {reason:<12} {v['entries']:>7} entries  {_size(v['bytes'])}")
    if dry_run:
        for v in rep.victims[:20]:
            print(f"  {v.id[:12]}  {v.reason:<12} {v.model:<10} last hit {_iso(v.last_hit)}  "
                  f"hits {v.hits}")
        if len(rep.victims) > 20:
            print(f"  ... and {len(rep.victims) - 20} more")
    return 0


def clear(store, model: str | None = None) -> int:
    ids = [e.id for e in store.entries() if model is None or e.model == model]
    return delete_ids(store, ids)


# ------------------------------------------------------------------- verify


def verify(store, repair: bool = False) -> dict:
    """Rows whose blobs are missing or corrupt, and blobs no row references.

    "missing": the digest is not among ``store.blob_digests()``; "corrupt": it
    is, but ``store.get_blob`` (which checks the sha256) returns None. Reads
    every referenced blob once. With ``repair``: bad rows are deleted (the store
    then drops blobs nothing references), and orphan blobs that are still
    unreferenced on a second look (a live daemon writes a blob just before its
    row) are deleted.
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
    orphans = sorted(present - set(users))
    bad_rows = sorted({i for d in missing + corrupt for i in users[d]})
    ids = {r.id for r in recs}
    report: dict[str, Any] = {
        "rows": len(recs), "blobs": len(present),
        "missing_blobs": missing, "corrupt_blobs": corrupt, "orphan_blobs": orphans,
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


def print_verify(rep: dict) -> None:
    print(f"checked {rep['rows']} rows and {rep['blobs']} blobs")
    for key, what in (("missing_blobs", "missing blobs (rows point to nothing)"),
                      ("corrupt_blobs", "corrupt blobs (checksum mismatch)"),
                      ("orphan_blobs", "orphan blobs (no row refers to them)")):
        if rep[key]:
            print(f"  {len(rep[key])} {what}: " + ", ".join(d[:12] for d in rep[key][:5])
                  + (" ..." if len(rep[key]) > 5 else ""))
    if rep["bad_rows"]:
        print(f"  {len(rep['bad_rows'])} rows with a missing or corrupt blob")
    if rep["aliases_without_origin"]:
        print(f"  note: {rep['aliases_without_origin']} aliases outlived their origin "
              "(fine: they keep their own blobs)")
    if not rep["problems"]:
        print("ok")
    elif rep["repaired"]:
        print(f"repaired: deleted {rep['deleted_rows']} rows and {rep['deleted_blobs']} "
              "orphan blobs")
    else:
        print(f"{rep['problems']} problems; run `rembgd cache verify --repair` to fix them")


# ---------------------------------------------------------- export / import


class ArchiveError(ValueError):
    """Not a rembgd cache archive, or one this version cannot read."""


def _b64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode("ascii") if raw else None


def _unb64(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text else None


def entry_to_json(e) -> dict:
    from daemon.cache.base import embedding_bytes

    fp = e.fp
    return {"id": e.id, "key": e.key, "model": e.model, "sha256": fp.sha256,
            "pixel_hash": fp.pixel_hash, "phash": _b64(fp.phash), "width": fp.width,
            "height": fp.height, "thumbs": _b64(fp.thumbs.to_bytes()),
            "embedding": _b64(embedding_bytes(fp.embedding)), "mask_digest": e.mask_digest,
            "output_digest": e.output_digest, "nbytes": e.nbytes, "created": e.created,
            "last_hit": e.last_hit, "hits": e.hits, "origin": e.origin}


def entry_from_json(d: dict):
    from daemon.imaging.fingerprint import AB_SIZE, LUMA_SIZE, PHASH_BITS
    from daemon.cache.base import Entry, fingerprint_from

    phash, thumbs = _unb64(d["phash"]) or b"", _unb64(d["thumbs"]) or b""
    if len(phash) != PHASH_BITS // 8 or len(thumbs) != LUMA_SIZE ** 2 + AB_SIZE ** 2 * 2:
        raise ValueError("bad phash or thumbnail size")
    for name in ("mask_digest", "output_digest"):
        v = d.get(name)
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"bad {name}")
    fp = fingerprint_from(str(d["sha256"]), str(d["pixel_hash"]), phash, int(d["width"]),
                          int(d["height"]), thumbs, _unb64(d.get("embedding")))
    return Entry(id=str(d["id"]), key=str(d["key"]), model=str(d["model"]), fp=fp,
                 mask_digest=d["mask_digest"], output_digest=d.get("output_digest"),
                 nbytes=int(d["nbytes"]), created=float(d["created"]),
                 last_hit=float(d["last_hit"]), hits=int(d["hits"]), origin=d.get("origin"))


def _digests(d: dict) -> list[str]:
    return [x for x in (d.get("mask_digest"), d.get("output_digest")) if x]


def export_archive(store, path: Path) -> dict:
    """Write ``path`` (zip) atomically; entries whose blobs cannot be read are left out."""
    from daemon import __version__

    path = Path(path)
    store.flush()
    digests: dict[str, None] = {}  # ordered set
    n_entries = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as lines:
        for e in store.entries():
            d = entry_to_json(e)
            lines.write(json.dumps(d, separators=(",", ":")) + "\n")
            for x in _digests(d):
                digests[x] = None
            n_entries += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        bad: set[str] = set()
        written = nbytes = kept = 0
        models: Counter = Counter()
        try:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                for x in digests:
                    data = store.get_blob(x)
                    if data is None:
                        bad.add(x)
                        continue
                    zf.writestr(f"blobs/{x}", data, compress_type=zipfile.ZIP_STORED)
                    written += 1
                    nbytes += len(data)
                lines.seek(0)
                info = zipfile.ZipInfo("entries.jsonl", time.localtime()[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as out:
                    for line in lines:
                        d = json.loads(line)
                        if any(x in bad for x in _digests(d)):
                            continue
                        out.write(line.encode("utf-8"))
                        kept += 1
                        models[d["model"]] += 1
                manifest = {"format": ARCHIVE_FORMAT, "schema_version": ARCHIVE_SCHEMA,
                            "created": time.time(), "rembgd_version": __version__,
                            "entries": kept, "blobs": written, "blob_bytes": nbytes,
                            "models": dict(models), "entries_member": "entries.jsonl",
                            "blob_prefix": "blobs/"}
                zf.writestr("manifest.json", json.dumps(manifest, indent=2),
                            compress_type=zipfile.ZIP_DEFLATED)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {"entries": kept, "blobs": written, "bytes": nbytes,
            "skipped_entries": n_entries - kept, "unreadable_blobs": sorted(bad)}


def import_archive(store, path: Path, current_keys: set[str] | None = None) -> dict:
    """Load an ``export_archive`` zip; verify blobs; idempotent (see module docstring)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"{path}: not a readable zip archive: {exc}") from exc
    with zf:
        try:
            manifest = json.loads(zf.read("manifest.json"))
        except (KeyError, ValueError) as exc:
            raise ArchiveError(f"{path}: no valid manifest.json: {exc}") from exc
        if manifest.get("format") != ARCHIVE_FORMAT:
            raise ArchiveError(f"{path}: not a rembgd cache archive "
                               f"(format {manifest.get('format')!r})")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > ARCHIVE_SCHEMA or version < 1:
            raise ArchiveError(f"{path}: archive schema {version!r} is not supported by this "
                               f"rembgd (reads up to {ARCHIVE_SCHEMA}); upgrade rembgd")
        member = manifest.get("entries_member", "entries.jsonl")
        prefix = manifest.get("blob_prefix", "blobs/")
        res = {"entries": 0, "imported": 0, "already_present": 0, "malformed": 0,
               "missing_blobs": 0, "bad_blobs": [], "blobs_written": 0,
               "other_settings": 0, "manifest": manifest}

        # pass 1: which entries are new here, and which blobs they need
        needed: set[str] = set()
        new_ids: set[str] = set()
        for d in _jsonl(zf, member, res):
            res["entries"] += 1
            try:
                entry_from_json(d)
            except (KeyError, TypeError, ValueError):
                res["malformed"] += 1
                continue
            if store.find_exact(d["key"], d["sha256"]) is not None:
                res["already_present"] += 1
                continue
            new_ids.add(d["id"])
            needed.update(_digests(d))
        # pass 2: blobs, each checked against its name before it is stored
        ok: set[str] = set()
        names = {n[len(prefix):]: n for n in zf.namelist() if n.startswith(prefix)}
        for digest in sorted(needed):
            name = names.get(digest)
            if name is None:
                if store.get_blob(digest) is not None:  # already here
                    ok.add(digest)
                continue
            data = zf.read(name)
            if hashlib.sha256(data).hexdigest() != digest:
                res["bad_blobs"].append(digest)
                continue
            store.put_blob(data)
            ok.add(digest)
            res["blobs_written"] += 1
        # pass 3: rows, after their blobs
        for d in _jsonl(zf, member, None):
            if d["id"] not in new_ids:
                continue
            if not all(x in ok for x in _digests(d)):
                res["missing_blobs"] += 1
                continue
            entry = entry_from_json(d)  # validated in pass 1
            store.restore(entry)
            res["imported"] += 1
            if current_keys is not None and entry.key not in current_keys:
                res["other_settings"] += 1
        store.flush()
    return res


def _jsonl(zf: zipfile.ZipFile, member: str, res: dict | None) -> Iterable[dict]:
    try:
        fh = zf.open(member)
    except KeyError as exc:
        raise ArchiveError(f"{zf.filename}: no {member} in the archive") from exc
    with fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
                if not isinstance(d, dict) or not all(
                        isinstance(d.get(k), str) for k in ("id", "key", "sha256", "mask_digest")):
                    raise ValueError("missing fields")
            except ValueError:
                if res is not None:
                    res["malformed"] += 1
                continue
            yield d


def print_import(res: dict, path: Path) -> None:
    print(f"{path}: {res['entries']} entries; imported {res['imported']}, already present "
          f"{res['already_present']}; wrote {res['blobs_written']} blobs")
    if res["bad_blobs"]:
        print(f"  {len(res['bad_blobs'])} blobs failed their checksum: "
              + ", ".join(d[:12] for d in res["bad_blobs"][:5]), file=sys.stderr)
    if res["missing_blobs"]:
        print(f"  {res['missing_blobs']} entries skipped: their blobs are missing or corrupt",
              file=sys.stderr)
    if res["malformed"]:
        print(f"  {res['malformed']} malformed entries skipped", file=sys.stderr)
    if res["other_settings"]:
        print(f"  note: {res['other_settings']} imported entries are for a model or options "
              "other than this config's; they are hit only with matching settings")
