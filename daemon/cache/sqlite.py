"""Embedded store: SQLite (WAL) index + content-addressed blob files + flock locks.

Layout under the cache directory::

    index.sqlite3        rows: fingerprints, blob digests, hit metadata
    blobs/ab/abcdef...   blob files named by their sha256 (checked on every read)
    locks/<name>.lock    flock-based locks; the kernel drops them if a process dies
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from daemon.imaging.fingerprint import BANDS, Fingerprint, hamming
from daemon.fsutil import atomic_write_bytes
from daemon.cache.base import TIERS, Entry, HitBuffer, embedding_bytes, fingerprint_from

SCHEMA_VERSION = 1
_BAND_COLS = [f"b{i}" for i in range(BANDS)]
_COLUMNS = ("id, key, model, sha256, pixel_hash, phash, width, height, thumbs, embedding, "
            "mask_digest, output_digest, nbytes, created, last_hit, hits, origin")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    pixel_hash TEXT NOT NULL,
    phash BLOB NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL" for c in _BAND_COLS)},
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    thumbs BLOB NOT NULL,
    embedding BLOB,
    mask_digest TEXT NOT NULL,
    output_digest TEXT,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_hit REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    origin TEXT
);
CREATE INDEX IF NOT EXISTS entries_sha ON entries (key, sha256);
CREATE INDEX IF NOT EXISTS entries_pixel ON entries (key, pixel_hash);
CREATE INDEX IF NOT EXISTS entries_last_hit ON entries (last_hit);
CREATE INDEX IF NOT EXISTS entries_mask ON entries (mask_digest);
CREATE INDEX IF NOT EXISTS entries_output ON entries (output_digest);
CREATE INDEX IF NOT EXISTS entries_nbytes ON entries (nbytes);  -- SUM(nbytes) scans this, not rows
{"".join(f"CREATE INDEX IF NOT EXISTS entries_{c} ON entries (key, {c});" for c in _BAND_COLS)}
CREATE TABLE IF NOT EXISTS tier_counts (
    hour INTEGER NOT NULL, tier TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (hour, tier)
);
"""


class BlobDir:
    """Content-addressed files; a read whose sha256 does not match is treated as absent."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            atomic_write_bytes(path, data)
        return digest

    def get(self, digest: str) -> bytes | None:
        try:
            data = self.path(digest).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            try:
                self.path(digest).unlink()  # repair: the row goes too, via the caller
            except OSError:
                pass
            return None
        return data

    def delete(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if len(f.name) == 64 and not f.name.startswith("."):
                        yield f.name

    def size(self) -> int:
        total = 0
        for d in self.digests():
            try:
                total += self.path(d).stat().st_size
            except FileNotFoundError:
                pass
        return total


class SqliteStore:
    """The embedded default backend (see module docstring)."""

    HIT_FLUSH_S = 2.0

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobDir(self.dir / "blobs")
        self.lock_dir = self.dir / "locks"
        self.lock_dir.mkdir(exist_ok=True)
        self.db_path = self.dir / "index.sqlite3"
        self._db = sqlite3.connect(self.db_path, timeout=10.0, check_same_thread=False,
                                   isolation_level=None)
        self._mutex = threading.RLock()
        try:
            with self._mutex:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA busy_timeout=10000")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
                # quick_check reads the whole file; a corrupt index raises here, at open time
                row = self._db.execute("PRAGMA quick_check").fetchone()
                if row[0] != "ok":
                    raise sqlite3.DatabaseError(
                        f"index {self.db_path} failed quick_check: {row[0]}")
        except BaseException:
            self._db.close()  # the service retries a failed open: never leak its descriptor
            raise
        self._buffer = HitBuffer()
        self._held: dict[str, tuple[str, int]] = {}

    # ------------------------------------------------------------- lookups

    def _rows(self, sql: str, args: tuple) -> list[Entry]:
        with self._mutex:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE {sql}", args).fetchall()
        return [self._entry(r) for r in rows]

    @staticmethod
    def _entry(r) -> Entry:
        (eid, key, model, sha, pix, phash, w, h, thumbs, emb, mask, out, nbytes, created,
         last_hit, hits, origin) = r
        return Entry(id=eid, key=key, model=model,
                     fp=fingerprint_from(sha, pix, phash, w, h, thumbs, emb),
                     mask_digest=mask, output_digest=out, nbytes=nbytes, created=created,
                     last_hit=last_hit, hits=hits, origin=origin)

    def find_exact(self, key: str, sha256: str) -> Entry | None:
        rows = self._rows("key = ? AND sha256 = ? ORDER BY created LIMIT 1", (key, sha256))
        return rows[0] if rows else None

    def find_pixel(self, key: str, pixel_hash: str) -> Entry | None:
        rows = self._rows("key = ? AND pixel_hash = ? ORDER BY created LIMIT 1", (key, pixel_hash))
        return rows[0] if rows else None

    def find_near(self, key: str, phash: bytes, radius: int) -> list[Entry]:
        from daemon.imaging.fingerprint import phash_bands

        bands = phash_bands(phash)
        union = " UNION ".join(
            f"SELECT id, phash FROM entries WHERE key = ? AND {c} = ? AND origin IS NULL"
            for c in _BAND_COLS)
        args: list = []
        for value in bands:
            args += [key, value]
        with self._mutex:
            cands = self._db.execute(union, args).fetchall()
        close = sorted((hamming(phash, bytes(p)), eid) for eid, p in cands)
        ids = [eid for d, eid in close if d <= radius][:16]
        if not ids:
            return []
        rows = self._rows(f"id IN ({','.join('?' * len(ids))})", tuple(ids))
        order = {eid: i for i, eid in enumerate(ids)}
        return sorted(rows, key=lambda e: order[e.id])

    def get_blob(self, digest: str) -> bytes | None:
        return self.blobs.get(digest)

    # -------------------------------------------------------------- writes

    def put(self, key: str, model: str, fp: Fingerprint, mask_png: bytes,
            output_png: bytes | None, origin: str | None = None) -> Entry:
        mask_digest = self.blobs.put(mask_png)
        out_digest = self.blobs.put(output_png) if output_png is not None else None
        now = time.time()
        entry = Entry(id=uuid.uuid4().hex, key=key, model=model, fp=fp, mask_digest=mask_digest,
                      output_digest=out_digest,
                      nbytes=len(mask_png) + (len(output_png) if output_png else 0),
                      created=now, last_hit=now, hits=0, origin=origin)
        self.restore(entry)
        return entry

    def restore(self, entry: Entry) -> None:
        fp = entry.fp
        cols = "id, key, model, sha256, pixel_hash, phash, " + ", ".join(_BAND_COLS) + \
            ", width, height, thumbs, embedding, mask_digest, output_digest, nbytes, created, " \
            "last_hit, hits, origin"
        values = (entry.id, entry.key, entry.model, fp.sha256, fp.pixel_hash, fp.phash, *fp.bands,
                  fp.width, fp.height, fp.thumbs.to_bytes(), embedding_bytes(fp.embedding),
                  entry.mask_digest, entry.output_digest, entry.nbytes, entry.created,
                  entry.last_hit, entry.hits, entry.origin)
        with self._mutex:
            self._db.execute(f"INSERT OR REPLACE INTO entries ({cols}) VALUES "
                             f"({','.join('?' * len(values))})", values)

    def put_blob(self, data: bytes) -> str:
        return self.blobs.put(data)

    def blob_digests(self) -> Iterator[str]:
        return self.blobs.digests()

    def delete_blob(self, digest: str) -> None:
        self.blobs.delete(digest)

    def record(self, entry_id: str | None, tier: str) -> None:
        with self._mutex:
            self._buffer.add(entry_id, tier, time.time())
            if self._buffer.due(self.HIT_FLUSH_S):
                self.flush()

    def flush(self) -> None:
        with self._mutex:
            hits, tiers = self._buffer.take()
            if not hits and not tiers:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE entries SET last_hit = max(last_hit, ?), hits = hits + ? WHERE id = ?",
                    [(t, n, eid) for eid, (t, n) in hits.items()])
                self._db.executemany(
                    "INSERT INTO tier_counts VALUES (?, ?, ?) "
                    "ON CONFLICT (hour, tier) DO UPDATE SET n = n + excluded.n",
                    [(h, t, n) for (h, t), n in tiers.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, ids: list[str]) -> int:
        """Delete rows, then any blob no remaining row references."""
        if not ids:
            return 0
        removed = 0
        with self._mutex:
            digests: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for m, o in self._db.execute(
                        f"SELECT mask_digest, output_digest FROM entries WHERE id IN ({marks})",
                        chunk):
                    digests.update(d for d in (m, o) if d)
                removed += self._db.execute(f"DELETE FROM entries WHERE id IN ({marks})",
                                            chunk).rowcount
            orphans = [d for d in digests if not self._db.execute(
                "SELECT 1 FROM entries WHERE mask_digest = ? OR output_digest = ? LIMIT 1",
                (d, d)).fetchone()]
        for d in orphans:
            self.blobs.delete(d)
        return removed

    # ------------------------------------------------------------- scanning

    def entries(self, chunk: int = 500) -> Iterator[Entry]:
        """All entries, read in rowid chunks so lookups are never blocked for long."""
        last = -1
        while True:
            with self._mutex:
                rows = self._db.execute(
                    f"SELECT rowid, {_COLUMNS} FROM entries WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for r in rows:
                yield self._entry(r[1:])

    def tier_counts(self, since: float) -> dict[str, int]:
        self.flush()
        with self._mutex:
            rows = self._db.execute(
                "SELECT tier, SUM(n) FROM tier_counts WHERE hour >= ? GROUP BY tier",
                (int(since // 3600),)).fetchall()
        counts = dict.fromkeys(TIERS, 0)
        counts.update({t: int(n) for t, n in rows})
        return counts

    def total_bytes(self) -> int:
        with self._mutex:
            blob_bytes = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
        index = sum(p.stat().st_size for p in self.dir.glob("index.sqlite3*") if p.exists())
        return int(blob_bytes) + index

    def count(self) -> int:
        with self._mutex:
            return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    # ---------------------------------------------------------------- locks

    def _lock_path(self, name: str) -> Path:
        return self.lock_dir / (hashlib.sha1(name.encode()).hexdigest() + ".lock")

    def try_lock(self, name: str, ttl: float) -> str | None:
        fd = os.open(self._lock_path(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        token = uuid.uuid4().hex
        with self._mutex:
            self._held[name] = (token, fd)
        return token

    def refresh_lock(self, name: str, token: str, ttl: float) -> bool:
        with self._mutex:
            held = self._held.get(name)
        return held is not None and held[0] == token  # flock has no expiry to extend

    def unlock(self, name: str, token: str) -> None:
        with self._mutex:
            held = self._held.get(name)
            if held is None or held[0] != token:
                return
            del self._held[name]
        os.close(held[1])  # closing drops the flock

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._mutex:
                for _, fd in self._held.values():
                    os.close(fd)
                self._held.clear()
                self._db.close()
