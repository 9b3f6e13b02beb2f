"""Embedded store: SQLite (WAL) index + content-addressed blob files; heals a damaged index.

Layout under the cache directory::

    index.sqlite3        rows: fingerprints, blob digests, hit metadata
    index.heal.lock      flock held while an index is opened and checked (one healer)
    blobs/ab/abcdef...   blob files named by their sha256 (checked on every read)
    locks/<sha1>.lock    flock locks (``daemon.coord.locks.FlockLocks``, not this module)
    index.sqlite3.corrupt-YYYYmmdd-HHMMSS[-wal|-shm]   a damaged index, set aside

Healing: the index is only a cache of what the blobs were computed for. An
index that SQLite reports malformed or "not a database", or that fails
``PRAGMA quick_check``, is renamed aside on open (logged as
``cache_index_corrupt``) and a fresh, empty one is started. The blobs stay:
they are content-addressed, so a later ``put`` of the same mask finds its blob
present (rewritten only when its bytes do not verify). Transient errors (a
locked database, a read-only or unreadable folder, a full disk) never set the
index aside: they raise ``StoreUnavailable`` and the caller retries.

While open, ``health()`` notices an index file that was removed, replaced,
truncated or overwritten (inode, size and header checks: no query, no scan);
a query that fails with a damage error marks the store damaged too. Either
way every later call raises ``StoreDamaged`` until the store is re-opened
(``daemon.cache.guard`` does that), which heals.

The header is read through a descriptor that is never closed while any
``SqliteStore`` of this process has that file open: closing a descriptor of a
file drops every POSIX lock the process holds on it, SQLite's included.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import structlog

from daemon.cache.base import (TIERS, Entry, HitBuffer, StoreDamaged, StoreError, StoreHealth,
                               StoreUnavailable, describe, embedding_bytes, fingerprint_from)
from daemon.fsutil import atomic_write_bytes
from daemon.imaging.fingerprint import BANDS, Fingerprint, hamming

log = structlog.get_logger("rembgd.store")

INDEX_NAME = "index.sqlite3"
HEAL_LOCK_NAME = "index.heal.lock"
MAGIC = b"SQLite format 3\x00"
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
    """Content-addressed files; a read whose sha256 does not match is treated as absent.

    Raises ``OSError``; ``SqliteStore`` turns it into ``StoreUnavailable``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data``; an existing file is reused only when its bytes are the same."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        try:
            same = path.stat().st_size == len(data) and path.read_bytes() == data
        except (FileNotFoundError, IsADirectoryError):
            same = False
        if not same:
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


# ------------------------------------------------------- index file checks


class _QuickCheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` did not answer "ok"."""


def _is_damage(exc: sqlite3.Error) -> bool:
    """SQLite says the file is not a (sound) database, as opposed to a transient error."""
    if isinstance(exc, _QuickCheckFailed):
        return True
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    return (name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text
            or "not a database" in text or text.startswith("no such table"))


def header_problem(head: bytes, size: int) -> str | None:
    """What is wrong with an SQLite file, judged from its first 100 bytes and its size."""
    if size == 0:
        return "the index file is empty (truncated)"
    if len(head) < 100 or not head.startswith(MAGIC):
        return f"the index file has no SQLite header ({size} bytes): truncated or overwritten"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"the index header is damaged (page size {page_size})"
    pages = int.from_bytes(head[28:32], "big")
    if head[24:28] == head[92:96] and size < pages * page_size:  # the page count is valid
        return f"the index file is truncated: {size} bytes, its header says {pages * page_size}"
    return None


class _HeaderFds:
    """Read-only descriptors of open index files, one per inode, refcounted per store.

    A descriptor is closed only when no store of this process has that inode
    open any more (see the module docstring).
    """

    def __init__(self):
        self._fds: dict[tuple[int, int], tuple[list[int], int]] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path) -> tuple[tuple[int, int], int]:
        """(inode key, descriptor) of the file at ``path``; raises ``OSError``."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._fds:
                fds, refs = self._fds[key]
                self._fds[key] = (fds, refs + 1)
                return key, fds[0]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)  # the file actually opened
        with self._lock:
            fds, refs = self._fds.get(key, ([], 0))
            self._fds[key] = (fds + [fd], refs + 1)  # never close a fd another store may need
            return key, self._fds[key][0][0]

    def release(self, key: tuple[int, int]) -> None:
        with self._lock:
            fds, refs = self._fds.get(key, ([], 1))
            if refs > 1:
                self._fds[key] = (fds, refs - 1)
                return
            self._fds.pop(key, None)
        for fd in fds:
            os.close(fd)


_HEADERS = _HeaderFds()


@contextmanager
def _heal_lock(folder: Path) -> Iterator[bool]:
    """flock on the folder's heal lock; yields False (no lock) where it cannot be created."""
    try:
        fd = os.open(folder / HEAL_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:  # read-only folder: nothing can be set aside there anyway
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


# ------------------------------------------------------------------- store


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
        with _heal_lock(self.dir):
            try:
                self._db = self._connect()
            except sqlite3.Error as exc:
                if not _is_damage(exc):
                    raise StoreUnavailable(f"cannot open the cache index {self.index_path}: "
                                           f"{describe(exc)}") from exc
                if not heal:
                    raise StoreDamaged(f"the cache index {self.index_path} is damaged: "
                                       f"{describe(exc)}") from exc
                self.set_aside = self._set_aside(exc)
                try:
                    self._db = self._connect()
                except sqlite3.Error as again:
                    raise StoreUnavailable(f"cannot start a fresh cache index "
                                           f"{self.index_path}: {describe(again)}") from again
            try:
                self._ident, self._fd = _HEADERS.acquire(self.index_path)
            except OSError as exc:
                self._db.close()
                raise StoreUnavailable(f"cannot read the cache index {self.index_path}: "
                                       f"{exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index_path, timeout=10.0, check_same_thread=False,
                             isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                       (str(SCHEMA_VERSION),))
            # quick_check reads the whole file: a damaged index shows here, at open time
            rows = [r[0] for r in db.execute("PRAGMA quick_check(5)").fetchall()]
            if rows != ["ok"]:
                raise _QuickCheckFailed(f"quick_check: {'; '.join(rows)}")
        except BaseException:
            db.close()  # a failed open is retried: never leak its descriptor
            raise
        return db

    def _set_aside(self, exc: sqlite3.Error) -> Path:
        """Rename the damaged index (and its -wal/-shm) aside; raise if that is impossible."""
        target = self.dir / f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
            n += 1
            target = self.dir / f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.index_path}{suffix}")
                if src.exists():
                    os.rename(src, f"{target}{suffix}")
        except OSError as err:  # e.g. a read-only cache folder: stays unavailable, retried
            raise StoreUnavailable(f"the cache index {self.index_path} is damaged "
                                   f"({describe(exc)}) and cannot be set aside: {err}") from exc
        log.error("cache_index_corrupt", path=str(self.index_path), moved_to=str(target),
                  error=describe(exc),
                  effect="started a fresh, empty index; blob files are kept and reused")
        return target

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
        try:
            st = os.stat(self.index_path)
        except FileNotFoundError:
            return "the index file was removed"
        except OSError:
            return None  # cannot tell (a failing mount): calls will say so
        if (st.st_dev, st.st_ino) != self._ident:
            return "the index file was replaced by another file"
        try:
            head = os.pread(self._fd, 100, 0)
        except OSError:
            return None
        return header_problem(head, st.st_size)

    def check_index(self) -> list[str]:
        """A full ``PRAGMA quick_check`` on a fresh read-only connection: problems, [] if sound.

        Reads the whole index (seconds for a large one): for ``cache verify``, not
        for a status loop. Raises ``StoreUnavailable`` when the index cannot be read.
        """
        try:
            db = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read {self.index_path}: {describe(exc)}") from exc
        try:
            rows = [r[0] for r in db.execute("PRAGMA quick_check(20)").fetchall()]
        except sqlite3.Error as exc:
            if _is_damage(exc):
                return [str(exc)]
            raise StoreUnavailable(f"cannot read {self.index_path}: {describe(exc)}") from exc
        finally:
            db.close()
        return [] if rows == ["ok"] else rows

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
                if _is_damage(exc):
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
            rows = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE {sql}", args).fetchall()
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
        fp = entry.fp
        cols = "id, key, model, sha256, pixel_hash, phash, " + ", ".join(_BAND_COLS) + \
            ", width, height, thumbs, embedding, mask_digest, output_digest, nbytes, created, " \
            "last_hit, hits, origin"
        values = (entry.id, entry.key, entry.model, fp.sha256, fp.pixel_hash, fp.phash, *fp.bands,
                  fp.width, fp.height, fp.thumbs.to_bytes(), embedding_bytes(fp.embedding),
                  entry.mask_digest, entry.output_digest, entry.nbytes, entry.created,
                  entry.last_hit, entry.hits, entry.origin)
        with self._index() as db:
            db.execute(f"INSERT OR REPLACE INTO entries ({cols}) VALUES "
                             f"({','.join('?' * len(values))})", values)

    def put_blob(self, data: bytes) -> str:
        with self._files():
            return self.blobs.put(data)

    def blob_digests(self) -> Iterator[str]:
        with self._files():
            yield from self.blobs.digests()

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
                    f"SELECT rowid, {_COLUMNS} FROM entries WHERE rowid > ? ORDER BY rowid LIMIT ?",
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
        counts = dict.fromkeys(TIERS, 0)
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
        _HEADERS.release(self._ident)  # after the connection: see _HeaderFds
