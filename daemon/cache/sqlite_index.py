"""The embedded store's index file: schema, opening, damage checks and healing.

Owns ``index.sqlite3`` as a file (``daemon.cache.sqlite`` owns its rows)::

    index.sqlite3        rows: fingerprints, blob digests, hit metadata
    index.heal.lock      flock held while an index is opened and checked (one healer)
    index.sqlite3.corrupt-YYYYmmdd-HHMMSS[-wal|-shm]   a damaged index, set aside

Healing: the index is only a cache of what the blobs were computed for. An
index that SQLite reports malformed or "not a database", or that fails
``PRAGMA quick_check``, is renamed aside on open (logged as
``cache_index_corrupt``) and a fresh, empty one is started. The blobs stay:
they are content-addressed, so a later ``put`` of the same mask finds its blob
present (rewritten only when its bytes do not verify). Transient errors (a
locked database, a read-only or unreadable folder, a full disk) never set the
index aside: they raise ``StoreUnavailable`` and the caller retries.

While open, ``file_problem`` notices an index file that was removed, replaced,
truncated or overwritten (inode, size and header checks: no query, no scan).

The header is read through a descriptor that is never closed while any
``SqliteStore`` of this process has that file open: closing a descriptor of a
file drops every POSIX lock the process holds on it, SQLite's included.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import structlog

from daemon.cache.base import StoreDamaged, StoreUnavailable, describe
from daemon.imaging.fingerprint import BANDS

log = structlog.get_logger("rembgd.store")

INDEX_NAME = "index.sqlite3"
HEAL_LOCK_NAME = "index.heal.lock"
MAGIC = b"SQLite format 3\x00"
SCHEMA_VERSION = 1
BAND_COLS = [f"b{i}" for i in range(BANDS)]
COLUMNS = ("id, key, model, sha256, pixel_hash, phash, width, height, thumbs, embedding, "
           "mask_digest, output_digest, nbytes, created, last_hit, hits, origin")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    pixel_hash TEXT NOT NULL,
    phash BLOB NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL" for c in BAND_COLS)},
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
{"".join(f"CREATE INDEX IF NOT EXISTS entries_{c} ON entries (key, {c});" for c in BAND_COLS)}
CREATE TABLE IF NOT EXISTS tier_counts (
    hour INTEGER NOT NULL, tier TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (hour, tier)
);
"""


# ------------------------------------------------------- damage or trouble


class QuickCheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` did not answer "ok"."""


def is_damage(exc: sqlite3.Error) -> bool:
    """SQLite says the file is not a (sound) database, as opposed to a transient error."""
    if isinstance(exc, QuickCheckFailed):
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


def file_problem(path: Path, ident: tuple[int, int], fd: int) -> str | None:
    """What happened to the index file opened as inode ``ident`` (header read via ``fd``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "the index file was removed"
    except OSError:
        return None  # cannot tell (a failing mount): calls will say so
    if (st.st_dev, st.st_ino) != ident:
        return "the index file was replaced by another file"
    try:
        head = os.pread(fd, 100, 0)
    except OSError:
        return None
    return header_problem(head, st.st_size)


def quick_check(path: Path) -> list[str]:
    """A full ``PRAGMA quick_check`` on a fresh read-only connection: problems, [] if sound.

    Raises ``StoreUnavailable`` when the index cannot be read.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read {path}: {describe(exc)}") from exc
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(20)").fetchall()]
    except sqlite3.Error as exc:
        if is_damage(exc):
            return [str(exc)]
        raise StoreUnavailable(f"cannot read {path}: {describe(exc)}") from exc
    finally:
        db.close()
    return [] if rows == ["ok"] else rows


# ------------------------------------------------------- header descriptors


class HeaderFds:
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


HEADERS = HeaderFds()


# ------------------------------------------------------------ open and heal


@dataclass
class OpenedIndex:
    db: sqlite3.Connection
    set_aside: Path | None  # where a damaged index went, when this open healed
    ident: tuple[int, int]  # (st_dev, st_ino) of the index file opened
    fd: int  # its header descriptor (HEADERS: release ``ident`` after closing ``db``)


@contextmanager
def heal_lock(folder: Path) -> Iterator[bool]:
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


def open_index(folder: Path, *, heal: bool = True) -> OpenedIndex:
    """Open (creating, checking, and when damaged and ``heal``, replacing) the index.

    Raises ``StoreUnavailable`` for transient trouble and ``StoreDamaged`` for a
    damaged index when ``heal`` is False.
    """
    index_path = folder / INDEX_NAME
    set_aside_to = None
    with heal_lock(folder):
        try:
            db = connect(index_path)
        except sqlite3.Error as exc:
            if not is_damage(exc):
                raise StoreUnavailable(f"cannot open the cache index {index_path}: "
                                       f"{describe(exc)}") from exc
            if not heal:
                raise StoreDamaged(f"the cache index {index_path} is damaged: "
                                   f"{describe(exc)}") from exc
            set_aside_to = set_aside(index_path, exc)
            try:
                db = connect(index_path)
            except sqlite3.Error as again:
                raise StoreUnavailable(f"cannot start a fresh cache index "
                                       f"{index_path}: {describe(again)}") from again
        try:
            ident, fd = HEADERS.acquire(index_path)
        except OSError as exc:
            db.close()
            raise StoreUnavailable(f"cannot read the cache index {index_path}: "
                                   f"{exc}") from exc
    return OpenedIndex(db, set_aside_to, ident, fd)


def connect(index_path: Path) -> sqlite3.Connection:
    """A WAL connection with the schema in place, after a quick_check of the whole file."""
    db = sqlite3.connect(index_path, timeout=10.0, check_same_thread=False,
                         isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                   (str(SCHEMA_VERSION),))
        # quick_check reads the whole file: a damaged index shows here, at open time
        rows = [r[0] for r in db.execute("PRAGMA quick_check(5)").fetchall()]
        if rows != ["ok"]:
            raise QuickCheckFailed(f"quick_check: {'; '.join(rows)}")
    except BaseException:
        db.close()  # a failed open is retried: never leak its descriptor
        raise
    return db


def last_set_aside(folder: Path) -> tuple[float, float] | None:
    """When the last damaged index in ``folder`` was set aside, if ever: the time in its
    name (whole seconds) and its ctime (the rename's instant, to the nanosecond)."""
    found = []
    for p in folder.glob(f"{INDEX_NAME}.corrupt-*"):
        stamp = p.name[len(INDEX_NAME) + len(".corrupt-"):][:15]
        try:
            found.append((time.mktime(time.strptime(stamp, "%Y%m%d-%H%M%S")),
                          p.stat().st_ctime))
        except (ValueError, OSError):
            continue
    return max(found, default=None)


def set_aside(index_path: Path, exc: sqlite3.Error) -> Path:
    """Rename the damaged index (and its -wal/-shm) aside; raise if that is impossible."""
    folder = index_path.parent
    target = folder / f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = folder / f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{index_path}{suffix}")
            if src.exists():
                os.rename(src, f"{target}{suffix}")
    except OSError as err:  # e.g. a read-only cache folder: stays unavailable, retried
        raise StoreUnavailable(f"the cache index {index_path} is damaged "
                               f"({describe(exc)}) and cannot be set aside: {err}") from exc
    log.error("cache_index_corrupt", path=str(index_path), moved_to=str(target),
              error=describe(exc),
              effect="started a fresh, empty index; blob files are kept and reused")
    return target
