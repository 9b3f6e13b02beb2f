"""The settle/retry queue: when a path goes to the workers.

Three kinds of entries, one heap and one thread that sleeps until the next is
due (no polling when idle):

* settle: a path from an event or a scan goes out once its size and mtime have
  stayed unchanged for ``settle_s`` (``complete``: at once, the writer is done);
* retry: a path the retry policy re-queues after a delay;
* standby: a path of a pair on standby (``daemon.service.standby``), due at the
  pair's next probe; ``wake(pair)`` makes them due at once (its inbox is back);
* not ready: a path a worker found empty or truncated comes back after a
  capped backoff, until ``incomplete_timeout_s`` passes without a change.
"""
from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(order=True)
class _Due:
    when: float
    seq: int
    pair: str
    path: Path
    kind: str  # "settle" | "complete" | "retry" | "standby"
    attempt: int = 0
    model: str | None = None  # a reviewer's redo keeps its model through retries


@dataclass
class _Waiting:
    """A path found not ready (empty, still incomplete): since when, as what, tries so far."""
    since: float
    sig: tuple[int, int] | None
    tries: int = 0


class SettleQueue:
    """Feeds due paths to ``submit(pair, path, attempt, model)`` (see the module docstring).

    ``submit`` may block (bounded queue): that is the back-pressure. ``not_ready``
    returns False once ``incomplete_timeout_s`` has passed without a change: the
    worker then fails the file as incomplete. ``clock`` (monotonic seconds) can be
    a fake: tests drive the queue with ``run_due()`` and never start the thread.
    """

    def __init__(self, settle_s: float, submit: Callable[[int, Path, int, str | None], None], *,
                 incomplete_timeout_s: float = 900.0, max_backoff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.settle_s = settle_s
        self.submit = submit
        self.incomplete_timeout_s = incomplete_timeout_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._heap: list[_Due] = []
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, since)
        self._live: dict[Path, int] = {}  # path -> seq of its one live entry; others are stale
        self._waiting: dict[Path, _Waiting] = {}
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="settle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __len__(self) -> int:
        with self._cv:
            return len(self._live)

    def _push(self, when: float, pair: str, path: Path, kind: str, attempt: int = 0,
              model: str | None = None) -> None:
        """Schedule ``path``; any entry scheduled for it before becomes stale (caller holds _cv)."""
        seq = next(self._seq)
        self._live[path] = seq
        heapq.heappush(self._heap, _Due(when, seq, pair, path, kind, attempt, model))
        self._cv.notify()

    def settle(self, pair: str, path: Path, *, complete: bool = False) -> None:
        """Check ``path`` soon; ``complete`` (close-after-write, moved-in) skips the wait."""
        with self._cv:
            if complete:
                self._seen.pop(path, None)
            elif path in self._live:
                return  # already scheduled; its stability check covers this event
            delay = 0.0 if complete else min(self.settle_s, 0.25)
            self._push(self.clock() + delay, pair, path, "complete" if complete else "settle")

    def retry(self, pair: str, path: Path, attempt: int, delay: float,
              model: str | None = None) -> None:
        with self._cv:
            self._push(self.clock() + delay, pair, path, "retry", attempt, model)

    def standby(self, pair: str, path: Path, attempt: int, delay: float,
                model: str | None = None) -> None:
        """Re-queue ``path`` after ``delay``, the wait of its pair on standby."""
        with self._cv:
            self._push(self.clock() + delay, pair, path, "standby", attempt, model)

    def wake(self, pair: str) -> int:
        """The standby waits of ``pair`` are due now (its folders are back, so the
        backoff, up to a minute, is cut short); returns how many."""
        with self._cv:
            now = self.clock()
            woken = [d for d in self._heap if d.kind == "standby" and d.pair == pair
                     and d.when > now and self._live.get(d.path) == d.seq]
            for d in woken:  # the old entries become stale
                self._push(now, d.pair, d.path, "standby", d.attempt, d.model)
            return len(woken)

    def not_ready(self, pair: str, path: Path, first_seen: float | None = None) -> bool:
        """``path`` was handed out but is not complete yet: check it again later.

        True: it is re-scheduled (or has vanished); leave it alone. False: it has not
        changed for ``incomplete_timeout_s`` (counted from ``first_seen``, a ``clock``
        time, else from the first call, and restarted by any change of size or
        mtime): fail it as incomplete.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.forget(path)
            return True
        sig = (st.st_size, st.st_mtime_ns)
        now = self.clock()
        with self._cv:
            self._prune_waiting(now)
            w = self._waiting.get(path)
            if w is None:
                w = self._waiting[path] = _Waiting(now if first_seen is None else first_seen, sig)
            elif w.sig != sig:  # it grew or was touched: still being written
                w.since, w.sig, w.tries = now, sig, 0
            left = w.since + self.incomplete_timeout_s - now
            if left <= 0:
                del self._waiting[path]
                return False
            delay = min(self.max_backoff_s, max(self.settle_s, 1.0) * 2 ** w.tries, left)
            w.tries += 1
            self._seen.pop(path, None)  # it must be unchanged for settle_s again
            self._push(now + max(delay, 0.05), pair, path, "settle")
        return True

    def waiting(self) -> list[tuple[Path, float, int]]:
        """Paths found not ready: (path, seconds until it is failed as incomplete if it
        stays unchanged, checks so far), soonest first."""
        now = self.clock()
        with self._cv:
            rows = [(path, w.since + self.incomplete_timeout_s - now, w.tries)
                    for path, w in self._waiting.items()]
        return sorted(rows, key=lambda row: row[1])

    def ready(self, path: Path) -> None:
        """``path`` turned out complete (processed, or failed for another reason)."""
        with self._cv:
            self._waiting.pop(path, None)

    def forget(self, path: Path) -> None:
        with self._cv:
            self._live.pop(path, None)
            self._seen.pop(path, None)
            self._waiting.pop(path, None)

    def _prune_waiting(self, now: float) -> None:
        """Drop waiting entries long past their timeout whose path is no longer scheduled
        (a caller that never called ``ready``); caller holds _cv."""
        limit = self.incomplete_timeout_s + 2 * self.max_backoff_s + self.settle_s
        for p in [p for p, w in self._waiting.items() if now - w.since > limit and p not in self._live]:
            del self._waiting[p]

    def _pop_due(self) -> _Due | None:
        """The next entry whose time has come, if any (caller holds _cv)."""
        if self._heap and self._heap[0].when <= self.clock():
            return heapq.heappop(self._heap)
        return None

    def run_due(self) -> int:
        """Handle every entry due by ``clock()`` now, in this thread; returns how many
        were submitted (for tests with a fake clock, and for a caller without the thread)."""
        n = 0
        while True:
            with self._cv:
                item = self._pop_due()
            if item is None:
                return n
            if self._check(item):
                self.submit(item.pair, item.path, item.attempt, item.model)
                n += 1

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (item := self._pop_due()) is None:
                    timeout = self._heap[0].when - self.clock() if self._heap else None
                    self._cv.wait(timeout)
                if self._stop:
                    return
            if self._check(item):
                self.submit(item.pair, item.path, item.attempt, item.model)

    def _check(self, item: _Due) -> bool:
        """True when the item should go to the workers now."""
        with self._cv:
            if self._live.get(item.path) != item.seq:
                return False  # superseded (e.g. a close-after-write came first): never twice
            if item.kind in ("retry", "standby"):
                del self._live[item.path]
                return True
        try:
            st = item.path.lstat()
        except FileNotFoundError:
            self.forget(item.path)
            return False
        now = self.clock()
        sig = (st.st_size, st.st_mtime_ns)
        with self._cv:
            if self._live.get(item.path) != item.seq:
                return False
            prev = self._seen.get(item.path)
            if item.kind == "complete" or (prev and prev[:2] == sig and now - prev[2] >= self.settle_s):
                del self._live[item.path]
                self._seen.pop(item.path, None)
                return True
            if prev is None or prev[:2] != sig:
                self._seen[item.path] = (*sig, now)
                wait = self.settle_s
            else:
                wait = self.settle_s - (now - prev[2])
            self._push(now + max(wait, 0.05), item.pair, item.path, "settle")
        return False
