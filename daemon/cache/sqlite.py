"""Embedded store: SQLite (WAL) index rows + content-addressed blob files.

Owns the rows: lookups (exact, pixel, pHash bands), writes, coalesced hit
counts, deletes with their orphaned blobs, scans and totals. Layout under the
cache directory::

    index.sqlite3        rows: fingerprints, blob digests, hit metadata
    index.heal.lock      flock held while an index is opened and checked (one healer)
    blobs/ab/abcdef...   blob files named by their sha256 (checked on every read)
    locks/<sha1>.lock    flock locks (``daemon.coord.locks.FlockLocks``, not this module)
    index.sqlite3.corrupt-YYYYmmdd-HHMMSS[-wal|-shm]   a damaged index, set aside

The index file itself (schema, opening, telling damage from transient trouble,
setting a damaged index aside) is ``daemon.cache.sqlite_index``; the blob folder
is ``daemon.cache.blobs``. A damaged index is set aside on open and a fresh one
started; transient errors raise ``StoreUnavailable`` and the caller retries.

While open, ``health()`` notices an index file that was removed, replaced,
truncated or overwritten (inode, size and header checks: no query, no scan);
a query that fails with a damage error marks the store damaged too. Either
way every later call raises ``StoreDamaged`` until the store is re-opened
(``daemon.cache.guard`` does that), which heals.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import structlog

from daemon.cache.base import (Tier, Entry, HitBuffer, StoreDamaged, StoreError, StoreHealth,
                               StoreUnavailable, describe, embedding_bytes, fingerprint_from)
from daemon.cache.blobs import BlobDir
from daemon.cache.sqlite_index import (BAND_COLS, COLUMNS, HEADERS, INDEX_NAME, SCHEMA_VERSION,
                                       file_problem, header_problem, is_damage, last_set_aside,
                                       open_index, quick_check)
from daemon.imaging.fingerprint import Fingerprint, hamming

__all__ = ["SqliteStore", "BlobDir", "INDEX_NAME", "SCHEMA_VERSION", "header_problem"]

log = structlog.get_logger("rembgd.store")


class SqliteStore:
    """The embedded default backend (see module docstring).

    ``heal=False``: a damaged index raises ``StoreDamaged`` instead of being set
    aside (to inspect it without changing anything).
    """

    name = "sqlite"
    HIT_FLUSH_S = 2.0

    def __init__(self, cache_dir: Path, *, heal: bool = True):
        self.dir = Path(cache_dir)
        self.index_path = self.dir / INDEX_NAME
        self.blobs = BlobDir(self.dir / "blobs")
        self.set_aside: Path | None = None  # where a damaged index went, when this open healed
        self._mutex = threading.RLock()
        self._buffer = HitBuffer()
        self._closed = False
        self._damaged: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the cache folder {self.dir}: {exc}") from exc
        opened = open_index(self.dir, heal=heal)
        self._db, self.set_aside = opened.db, opened.set_aside
        self._ident, self._fd = opened.ident, opened.fd

    # -------------------------------------------------------------- health

    def health(self) -> StoreHealth:
        """Inode, size and header of the index file (no query, no scan); never raises."""
        if self._closed:
            return StoreHealth(False, error=f"the cache index {self.index_path} is closed")
        if self._damaged is None:
            with self._mutex:  # no checkpoint of ours runs meanwhile
                problem = self._file_problem()
            if problem and problem.startswith("the index file is truncated:"):
                time.sleep(0.1)  # maybe another process's checkpoint in flight: look again
                with self._mutex:
                    problem = self._file_problem()
            if problem and self._damaged is None:
                self._damaged = f"{problem} ({self.index_path})"
        if self._damaged is not None:
            return StoreHealth(False, error=self._damaged, damaged=True)
        return StoreHealth(True)

    def _file_problem(self) -> str | None:
        return file_problem(self.index_path, self._ident, self._fd)

    def check_index(self) -> list[str]:
        """A full ``PRAGMA quick_check`` on a fresh read-only connection: problems, [] if sound.

        Reads the whole index (seconds for a large one): for ``cache verify``, not
        for a status loop. Raises ``StoreUnavailable`` when the index cannot be read.
        """
        return quick_check(self.index_path)

    @contextmanager
    def _index(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the mutex; sqlite3 errors become ``StoreError``s."""
        with self._mutex:
            if self._closed:
                raise StoreUnavailable(f"the cache index {self.index_path} is closed")
            if self._damaged is not None:
                raise StoreDamaged(self._damaged)
            try:
                yield self._db
            except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise  # misuse of the API: a bug, not an unavailable cache
            except sqlite3.Error as exc:
                if is_damage(exc):
                    self._damaged = f"the index is damaged: {exc} ({self.index_path})"
                    raise StoreDamaged(self._damaged) from exc
                raise StoreUnavailable(f"cache index {self.index_path}: {describe(exc)}") from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The index connection inside one write transaction, for bulk loads (bench, import).

        Holds the store's mutex throughout; commits on success, rolls back on error.
        """
        with self._index() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _files(self) -> Iterator[None]:
        """Blob file I/O: ``OSError`` becomes ``StoreUnavailable``."""
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(f"cache folder {self.dir}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------- lookups

    def _rows(self, sql: str, args: tuple) -> list[Entry]:
        with self._index() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM entries WHERE {sql}", args).fetchall()
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
            for c in BAND_COLS)
        args: list = []
        for value in bands:
            args += [key, value]
        with self._index() as db:
            cands = db.execute(union, args).fetchall()
        close = sorted((hamming(phash, bytes(p)), eid) for eid, p in cands)
        ids = [eid for d, eid in close if d <= radius][:16]
        if not ids:
            return []
        rows = self._rows(f"id IN ({','.join('?' * len(ids))})", tuple(ids))
        order = {eid: i for i, eid in enumerate(ids)}
        return sorted(rows, key=lambda e: order[e.id])

    def get_blob(self, digest: str) -> bytes | None:
        with self._files():
            return self.blobs.get(digest)

    # -------------------------------------------------------------- writes

    def put(self, key: str, model: str, fp: Fingerprint, mask_png: bytes,
            output_png: bytes | None, origin: str | None = None) -> Entry:
        with self._files():
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
        self.restore_many([entry])

    def restore_many(self, entries: list[Entry], blobs: Iterable[bytes] = ()) -> None:
        """Write ``blobs``, then insert or replace ``entries`` as-is in one transaction."""
        with self._files():
            for data in blobs:
                self.blobs.put(data)
        cols = "id, key, model, sha256, pixel_hash, phash, " + ", ".join(BAND_COLS) + \
            ", width, height, thumbs, embedding, mask_digest, output_digest, nbytes, created, " \
            "last_hit, hits, origin"
        rows = [(e.id, e.key, e.model, e.fp.sha256, e.fp.pixel_hash, e.fp.phash, *e.fp.bands,
                 e.fp.width, e.fp.height, e.fp.thumbs.to_bytes(), embedding_bytes(e.fp.embedding),
                 e.mask_digest, e.output_digest, e.nbytes, e.created, e.last_hit, e.hits,
                 e.origin) for e in entries]
        marks = ",".join("?" * len(cols.split(",")))
        with self._index() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(f"INSERT OR REPLACE INTO entries ({cols}) VALUES ({marks})", rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def put_blob(self, data: bytes) -> str:
        with self._files():
            return self.blobs.put(data)

    def blob_digests(self) -> Iterator[str]:
        with self._files():
            yield from self.blobs.digests()

    def kept_by_heal(self, ttl_days: float) -> Callable[[str], bool]:
        """Which blobs a heal kept: present when the index was last set aside, within
        ``ttl_days`` of it (0: no age limit), as the pruner's age rule would keep a row
        hit then. Such a blob without a row is reused by the next ``put`` of its bytes."""
        healed = last_set_aside(self.dir)
        if healed is None or (ttl_days > 0 and time.time() - healed[0] > ttl_days * 86400):
            return lambda digest: False

        def kept(digest: str) -> bool:
            written = self.blobs.mtime(digest)
            return written is not None and written <= healed[1]
        return kept

    def delete_blob(self, digest: str) -> None:
        with self._files():
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
            try:
                with self._index() as db:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        db.executemany(
                            "UPDATE entries SET last_hit = max(last_hit, ?), hits = hits + ? "
                            "WHERE id = ?", [(t, n, eid) for eid, (t, n) in hits.items()])
                        db.executemany(
                            "INSERT INTO tier_counts VALUES (?, ?, ?) "
                            "ON CONFLICT (hour, tier) DO UPDATE SET n = n + excluded.n",
                            [(h, t, n) for (h, t), n in tiers.items()])
                        db.execute("COMMIT")
                    except BaseException:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        raise
            except BaseException:
                self._buffer.merge_back(hits, tiers)  # for the next flush
                raise

    def delete(self, ids: list[str]) -> int:
        """Delete rows, then any blob no remaining row references."""
        if not ids:
            return 0
        removed = 0
        with self._index() as db:
            digests: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for m, o in db.execute(
                        f"SELECT mask_digest, output_digest FROM entries WHERE id IN ({marks})",
                        chunk):
                    digests.update(d for d in (m, o) if d)
                removed += db.execute(f"DELETE FROM entries WHERE id IN ({marks})",
                                      chunk).rowcount
            orphans = [d for d in digests if not db.execute(
                "SELECT 1 FROM entries WHERE mask_digest = ? OR output_digest = ? LIMIT 1",
                (d, d)).fetchone()]
        with self._files():
            for d in orphans:
                self.blobs.delete(d)
        return removed

    # ------------------------------------------------------------- scanning

    def entries(self, chunk: int = 500) -> Iterator[Entry]:
        """All entries, read in rowid chunks so lookups are never blocked for long."""
        last = -1
        while True:
            with self._index() as db:
                rows = db.execute(
                    f"SELECT rowid, {COLUMNS} FROM entries WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for r in rows:
                yield self._entry(r[1:])

    def tier_counts(self, since: float) -> dict[str, int]:
        self.flush()
        with self._index() as db:
            rows = db.execute(
                "SELECT tier, SUM(n) FROM tier_counts WHERE hour >= ? GROUP BY tier",
                (int(since // 3600),)).fetchall()
        counts = dict.fromkeys(Tier, 0)
        counts.update({t: int(n) for t, n in rows})
        return counts

    def total_bytes(self) -> int:
        """Blob bytes the rows account for, plus the index files (not a set-aside index)."""
        with self._index() as db:
            blob_bytes = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
        index = 0
        with self._files():
            for suffix in ("", "-wal", "-shm"):
                try:
                    index += os.stat(f"{self.index_path}{suffix}").st_size
                except FileNotFoundError:
                    pass
        return int(blob_bytes) + index

    def count(self) -> int:
        with self._index() as db:
            return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        """Flush hit counts (lost, with a warning, if the index fails) and close; idempotent."""
        with self._mutex:
            if self._closed:
                return
            try:
                self.flush()
            except StoreError as exc:
                log.warning("hit_counts_lost", error=describe(exc))
            self._closed = True
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        HEADERS.release(self._ident)  # after the connection: see HeaderFds
