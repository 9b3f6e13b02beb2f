"""Portable cache archives: ``rembgd cache export | import``.

A zip file:

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
import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterable

ARCHIVE_FORMAT = "rembgd-cache"
ARCHIVE_SCHEMA = 1


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
