"""The recent-outputs journal: one SQLite table the page reads the newest rows of.

SQLite (stdlib) rather than a hand-made ring file: every append is atomic and
survives a kill -9, and ``ORDER BY id DESC LIMIT n`` walks only n rows of the
rowid b-tree, so the page costs the same with 10 or 100,000 rows. The table is
trimmed to ``keep`` rows now and then.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from daemon.web.controller import RecentOutput

SCHEMA = """CREATE TABLE IF NOT EXISTS recent (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL, pair INTEGER NOT NULL, source_root TEXT, source_rel TEXT NOT NULL,
    outputs TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL, ms REAL NOT NULL)"""
TRIM_EVERY = 500


class Journal:
    def __init__(self, path: Path, keep: int = 50_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.keep = path, keep
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._since_trim = 0
        self._closed = False

    def add(self, entry: RecentOutput) -> None:
        with self._lock:
            if self._closed:
                return  # the server was stopped meanwhile (a reload, shutdown)
            self._db.execute(
                "INSERT INTO recent (time, pair, source_root, source_rel, outputs, tier, model,"
                " ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.time, entry.pair, entry.source_root, entry.source_rel,
                 json.dumps(entry.outputs), entry.tier, entry.model, entry.ms))
            self._since_trim += 1
            if self._since_trim >= TRIM_EVERY:
                self._since_trim = 0
                self._db.execute("DELETE FROM recent WHERE id <= (SELECT max(id) FROM recent) - ?",
                                 (self.keep,))

    def last(self, n: int) -> list[RecentOutput]:
        """The newest ``n`` entries, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT time, pair, source_root, source_rel, outputs, tier, model, ms"
                " FROM recent ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [RecentOutput(t, p, root, rel, tuple(json.loads(outs)), tier, model, ms)
                for t, p, root, rel, outs, tier, model, ms in rows]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
