"""``rembgd cache stats | prune | clear | verify | export | import``: dispatch and printing."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from daemon.cache.archive import ArchiveError, export_archive, import_archive
from daemon.cache.maintenance import clear, iso, stats, verify
from daemon.cache.pruner import Pruner
from daemon.cache.sqlite import SqliteStore
from daemon.config import Config
from daemon.coord.locks import LockBackend
from daemon.service.app import open_cache

COMMANDS = (("stats", "entries, bytes, hit rate by tier"),
            ("prune", "apply the limits now"),
            ("clear", "remove entries"),
            ("verify", "check rows and blobs"),
            ("export", "write a portable archive"),
            ("import", "load a portable archive"))


def add_parser(sub) -> None:
    cache = sub.add_parser("cache", help="inspect and maintain the mask cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, helptext in COMMANDS:
        c = csub.add_parser(name, help=helptext)
        c.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
        if name == "stats":
            c.add_argument("--window-hours", type=float, default=24.0)
            c.add_argument("--json", action="store_true")
        if name == "prune":
            c.add_argument("--dry-run", action="store_true")
        if name == "clear":
            c.add_argument("--model")
        if name == "verify":
            c.add_argument("--repair", action="store_true")
        if name in ("export", "import"):
            c.add_argument("archive", type=Path)


def run(args, cfg: Config) -> int:
    command = args.cache_command
    cache = open_cache(cfg)  # the daemon's own store, guard and locks
    if cache is None:
        print("rembgd: the cache is disabled (cache.enabled: false); nothing to "
              f"{command}", file=sys.stderr)
        return 1
    state = cache.guard.status()
    store = cache.guard.store
    if store is None or not state["available"]:  # unreachable Redis, unwritable dir
        print(f"rembgd: cannot open the cache ({cfg.store.backend}): {state['error']}",
              file=sys.stderr)
        cache.close()
        return 1
    set_aside = getattr(store, "set_aside", None)
    if set_aside is not None:
        print(f"rembgd: the cache index was damaged; it was moved to {set_aside} and a fresh "
              "one started (blobs are kept and reused)", file=sys.stderr)
    try:
        if command == "stats":
            data = stats(store, cfg.store, cfg.cache, getattr(args, "window_hours", 24.0))
            if getattr(args, "json", False):
                print(json.dumps(data, indent=2))
            else:
                print_stats(data)
            return 0
        if command == "prune":
            return cmd_prune(store, cfg, cache.locks, getattr(args, "dry_run", False))
        if command == "clear":
            n = clear(store, getattr(args, "model", None))
            which = f"of model {args.model} " if getattr(args, "model", None) else ""
            print(f"cleared {n} entries {which}".rstrip())
            return 0
        if command == "verify":
            kept = store.kept_by_heal(cfg.cache.limits.ttl_days) \
                if isinstance(store, SqliteStore) else (lambda digest: False)
            report = verify(store, repair=getattr(args, "repair", False), kept=kept)
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
        cache.close()
    print(f"rembgd: unknown cache command {command!r}", file=sys.stderr)
    return 2


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _current_keys(cfg: Config) -> set[str] | None:
    """Mask and output keys of the configured pairs (None if a model is not installed)."""
    from daemon.imaging.keys import mask_key, targets
    from daemon.inference.engine import Engines
    from daemon.inference.models import ModelError

    engines = Engines(cfg.models_dir, cfg.threads)
    keys = set()
    try:
        plans = {(p.options, p.outputs) for p in cfg.watch} | {(cfg.output, cfg.outputs)}
        for options, outputs in plans:
            mkey = mask_key(options, engines.model_file(options.model).md5)
            keys.add(mkey)
            keys.update(t.output_key for t in targets(mkey, options, outputs))
    except ModelError:
        return None
    return keys


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


def cmd_prune(store, cfg: Config, locks: LockBackend, dry_run: bool) -> int:
    rep = Pruner(store, cfg.cache.limits, cfg.cache.prune, locks,
                 structlog.get_logger("rembgd.prune")).run(dry_run=dry_run)
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
            print(f"  {v.id[:12]}  {v.reason:<12} {v.model:<10} last hit {iso(v.last_hit)}  "
                  f"hits {v.hits}")
        if len(rep.victims) > 20:
            print(f"  ... and {len(rep.victims) - 20} more")
    return 0


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
    if rep["kept_blobs"]:
        print(f"  {len(rep['kept_blobs'])} blobs kept from the healed index (no row refers to "
              "them; reused when the same mask is stored again, removed after ttl_days)")
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
