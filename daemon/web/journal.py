"""The outputs journal: one SQLite table of every delivered, held, approved or
touched-up cutout, which the page and the API page through and search.

SQLite (stdlib) rather than a hand-made ring file: every append is atomic and
survives a kill -9. ``ORDER BY id DESC LIMIT n`` walks only n rows of the rowid
b-tree; a search is one scan of the table with plain comparisons (about 20 ms per
100,000 rows, bench/web_bench.py), with indexes for tier and model. The table is
trimmed to ``keep`` rows now and then.

The search language (``parse_query``): words match the source's path (any part,
case-insensitive), and ``tier:``, ``model:``, ``reason:``, ``event:``, ``date:``
(``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``, local time) narrow it.
"""
from __future__ import annotations

import datetime
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.web.controller import RecentOutput

SCHEMA = """CREATE TABLE IF NOT EXISTS recent (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL, pair TEXT NOT NULL, source_root TEXT, source_rel TEXT NOT NULL,
    outputs TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL, ms REAL NOT NULL)"""
ADDED = {  # columns added after the first release, with their defaults
    "event": "TEXT NOT NULL DEFAULT 'delivered'", "confidence": "REAL",
    "reasons": "TEXT NOT NULL DEFAULT '[]'", "outputs_root": "TEXT NOT NULL DEFAULT 'outbox'"}
INDEXES = ("CREATE INDEX IF NOT EXISTS recent_tier ON recent (tier)",
           "CREATE INDEX IF NOT EXISTS recent_model ON recent (model)",
           "CREATE INDEX IF NOT EXISTS recent_source ON recent (source_rel, pair)")
COLUMNS = ("id, time, pair, source_root, source_rel, outputs, tier, model, ms, event, "
           "confidence, reasons, outputs_root")
TRIM_EVERY = 500
FILTERS = ("tier", "model", "reason", "event", "date")


class QueryError(ValueError):
    """A search the journal cannot run (the message says which term)."""


@dataclass(frozen=True)
class Query:
    words: tuple[str, ...] = ()
    terms: dict[str, str] = field(default_factory=dict)


def parse_query(text: str) -> Query:
    words, terms = [], {}
    for part in text.split():
        key, sep, value = part.partition(":")
        if sep and key.lower() in FILTERS:
            if not value:
                raise QueryError(f"{key}: needs a value ({key}:...)")
            terms[key.lower()] = value
        else:
            words.append(part)
    if "date" in terms:
        _day_range(terms["date"])  # checked now: a bad date is the caller's 400
    return Query(tuple(words), terms)


def _day_range(text: str) -> tuple[float, float]:
    """[start, end) in unix time of a local year, month or day."""
    parts = text.split("-")
    try:
        if not 1 <= len(parts) <= 3 or len(parts[0]) != 4:
            raise ValueError
        nums = [int(p) for p in parts]
        start = [nums[0], nums[1] if len(nums) > 1 else 1, nums[2] if len(nums) > 2 else 1]
        datetime.date(*start)  # a real day: ValueError for month 13 or day 32
        end = list(start)
        end[len(nums) - 1] += 1
        if len(nums) == 2 and end[1] == 13:
            end = [end[0] + 1, 1, 1]
        t0 = time.mktime((*start, 0, 0, 0, 0, 0, -1))
        t1 = time.mktime((*end, 0, 0, 0, 0, 0, -1))  # mktime normalises day 32, month 13
    except (ValueError, OverflowError):
        raise QueryError(f"date: {text!r} is not YYYY, YYYY-MM or YYYY-MM-DD") from None
    return t0, t1


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _where(query: Query) -> tuple[str, list]:
    clauses, args = [], []
    for word in query.words:
        clauses.append("source_rel LIKE ? ESCAPE '\\'")
        args.append(_like(word))
    t = query.terms
    if "tier" in t:
        clauses.append("tier = ?")
        args.append(t["tier"].lower())
    if "model" in t:
        clauses.append("model = ?")
        args.append(t["model"])
    if "event" in t:
        clauses.append("event = ?")
        args.append(t["event"].lower())
    if "reason" in t:
        clauses.append("reasons LIKE ? ESCAPE '\\'")
        args.append(_like(t["reason"]))
    if "date" in t:
        clauses.append("time >= ? AND time < ?")
        args.extend(_day_range(t["date"]))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class Journal:
    def __init__(self, path: Path, keep: int = 200_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.keep = path, keep
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._create()
        if self._pair_type() == "INTEGER":
            self._rekey()
        for sql in INDEXES:
            self._db.execute(sql)
        self._since_trim = 0
        self._closed = False

    def _create(self) -> None:
        self._db.execute(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(recent)")}
        for name, decl in ADDED.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE recent ADD COLUMN {name} {decl}")

    def _pair_type(self) -> str:
        return next(row[2] for row in self._db.execute("PRAGMA table_info(recent)")
                    if row[1] == "pair").upper()

    def _rekey(self) -> None:
        """A journal of an older version named pairs by their index in the config of its
        day, which a reload may have moved: its rows keep ``#<index>``, which is no pair's
        key (a name has no '#', an inbox path starts with '/'), so they are listed but
        never act on a pair. Once, in one transaction."""
        cols = COLUMNS.replace("pair,", "'#' || pair,")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DROP INDEX IF EXISTS recent_source")
            self._db.execute("ALTER TABLE recent RENAME TO recent_by_index")
            self._create()
            self._db.execute(f"INSERT INTO recent ({COLUMNS}) SELECT {cols} FROM recent_by_index")
            self._db.execute("DROP TABLE recent_by_index")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def add(self, entry: RecentOutput) -> int | None:
        """Append ``entry``; its row id (None once closed)."""
        with self._lock:
            if self._closed:
                return None  # the server was stopped meanwhile (a reload, shutdown)
            cur = self._db.execute(
                "INSERT INTO recent (time, pair, source_root, source_rel, outputs, tier, model,"
                " ms, event, confidence, reasons, outputs_root)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.time, entry.pair, entry.source_root, entry.source_rel,
                 json.dumps(entry.outputs), entry.tier, entry.model, entry.ms, entry.event,
                 entry.confidence, json.dumps(entry.reasons), entry.outputs_root))
            self._since_trim += 1
            if self._since_trim >= TRIM_EVERY:
                self._since_trim = 0
                self._db.execute("DELETE FROM recent WHERE id <= (SELECT max(id) FROM recent) - ?",
                                 (self.keep,))
            return cur.lastrowid

    def last(self, n: int) -> list[RecentOutput]:
        """The newest ``n`` entries, newest first."""
        return self.search(Query(), n, 0)[1]

    def search(self, query: Query, limit: int, offset: int = 0) -> tuple[int, list[RecentOutput]]:
        """(how many entries match, the page of them from ``offset``), newest first."""
        where, args = _where(query)
        with self._lock:
            if self._closed:
                return 0, []
            total = self._db.execute(f"SELECT count(*) FROM recent{where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM recent{where} ORDER BY id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset]).fetchall()
        return total, [_entry(row) for row in rows]

    def get(self, id_: int) -> RecentOutput | None:
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS} FROM recent WHERE id = ?",
                                   (id_,)).fetchone()
        return _entry(row) if row else None

    def latest_for(self, pair: str, source_rel: str) -> RecentOutput | None:
        """The newest entry of one source (what its item view shows)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM recent WHERE pair = ? AND source_rel = ?"
                " ORDER BY id DESC LIMIT 1", (pair, source_rel)).fetchone()
        return _entry(row) if row else None

    def last_time(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT time FROM recent ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()


def _entry(row) -> RecentOutput:
    (id_, t, pair, root, rel, outs, tier, model, ms, event, conf, reasons, outputs_root) = row
    return RecentOutput(t, pair, root, rel, tuple(json.loads(outs)), tier, model, ms, id_,
                        event, conf, tuple(json.loads(reasons)), outputs_root)
