"""The pruner: runs the prune policy against a store, in small batches, on a schedule.

Only one pruner runs at a time per cache (the ``prune`` lock of the lock
backend), which matters when several daemons share a Redis cache. Deleting
goes through ``store.delete`` in batches sized from the measured time of the
previous batch to hold the store about ``BATCH_TARGET_MS``.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

from daemon.cache.policy import (BATCH_IDS, BATCH_MIN_IDS, BATCH_PAUSE_S, BATCH_TARGET_MS,
                                 LOCK_NAME, LOCK_TTL_S, REASONS, PrunePlan, Victim,
                                 estimate_blob_sizes, last_daily, plan_prune, slim)
from daemon.config import CacheLimits, PruneSchedule


@dataclass
class PruneReport:
    dry_run: bool
    policy: str
    entries_before: int = 0
    entries_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    removed: dict[str, dict[str, int]] = field(
        default_factory=lambda: {r: {"entries": 0, "bytes": 0} for r in REASONS})
    deleted: int = 0  # rows the store actually deleted (0 on a dry run)
    batches: int = 0
    max_batch_ms: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None  # why nothing ran (another pruner holds the lock)
    cancelled: bool = False
    victims: list[Victim] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.victims]


class Pruner:
    """Applies ``CacheLimits`` to a store on the ``PruneSchedule``.

    ``Pruner(store, cache.limits, cache.prune, locks)``; the service
    calls ``due(time.time())`` from its loop and ``run()`` on a thread.
    """

    def __init__(self, store, limits: CacheLimits, schedule: PruneSchedule, locks=None,
                 log=None, *, clock: Callable[[], float] = time.time, batch_size: int = BATCH_IDS,
                 pause_s: float = BATCH_PAUSE_S):
        self.store = store
        self.locks = locks  # a LockBackend: one pruner per cache at a time (None: no lock)
        self.limits = limits
        self.schedule = schedule
        self.log = log if log is not None else structlog.get_logger("rembgd.prune")
        self.clock = clock
        self.batch_size = max(1, int(batch_size))
        self.pause_s = pause_s
        self._armed_at = clock()
        self._last_run: float | None = None
        self._last_limit_check = -math.inf
        self._mark = (0, 0)  # store.count(), store.total_bytes() after the last run
        self._cancel = threading.Event()

    # ------------------------------------------------------------ schedule

    def due(self, now: float) -> bool:
        """True when a run is due: start-up, every ``interval_s``, the daily time, a limit."""
        s = self.schedule
        if s.interval_s > 0 and (self._last_run is None or now - self._last_run >= s.interval_s):
            return True
        if s.daily_at:
            since = self._last_run if self._last_run is not None else self._armed_at
            if since < last_daily(s.daily_at, now) <= now:
                return True
        if now - self._last_limit_check >= s.limit_check_s:
            self._last_limit_check = now
            return self.limit_crossed()
        return False

    def limit_crossed(self) -> bool:
        """The cheap check: ``count() > max_entries`` or ``total_bytes() > max_bytes``.

        ``count()`` is cheap on every backend; ``total_bytes()`` is not on SQLite
        (a full table scan under the store's lock: ~0.3 s at 20k rows). So bytes
        are extrapolated from the count with the bytes per entry seen at the last
        run, and ``total_bytes()`` is asked only when that estimate is within 10%
        of the limit (or before any run). After a run that could not get the
        cheap numbers under a limit (shared blobs are counted once by the plan,
        maybe not by ``total_bytes``), the limit must be exceeded by a further
        margin before it triggers again.
        """
        lim = self.limits
        slack = max(1.0 - lim.low_water, 0.02) / 2
        if lim.max_entries <= 0 and lim.max_bytes <= 0:
            return False
        n = self.store.count()
        if lim.max_entries > 0:
            bar = max(lim.max_entries, self._mark[0] + slack * lim.max_entries) \
                if self._mark[0] > lim.max_entries else lim.max_entries
            if n > bar:
                return True
        if lim.max_bytes > 0:
            bar = max(lim.max_bytes, self._mark[1] + slack * lim.max_bytes) \
                if self._mark[1] > lim.max_bytes else lim.max_bytes
            if self._mark[0] > 0:
                estimate = n * self._mark[1] / self._mark[0]
                if estimate < 0.9 * bar:
                    return False
            if self.store.total_bytes() > bar:
                return True
        return False

    def cancel(self) -> None:
        """Stop a running ``run`` after its current batch (e.g. on SIGTERM)."""
        self._cancel.set()

    # ------------------------------------------------------------------ run

    def plan(self, now: float | None = None) -> PrunePlan:
        store = self.store
        store.flush()  # coalesced hit counts first: they decide who goes
        now = self.clock() if now is None else now
        recs = slim(store.entries())
        overhead = max(0, int(store.total_bytes()) - sum(r.nbytes for r in recs))
        sizes = estimate_blob_sizes(recs, resolve=self._blob_size)
        return plan_prune(recs, self.limits, now, overhead, blob_sizes=sizes)

    def _blob_size(self, digest: str) -> int:
        data = self.store.get_blob(digest)
        return len(data) if data is not None else 0

    def run(self, dry_run: bool = False) -> PruneReport:
        t0 = time.perf_counter()
        self._cancel.clear()
        report = PruneReport(dry_run=dry_run, policy=self.limits.policy)
        token = None
        if not dry_run:
            self._last_run = self.clock()  # also on failure: a broken store is retried later
            token = self.locks.try_lock(LOCK_NAME, LOCK_TTL_S) if self.locks else "unlocked"
            if token is None:
                report.skipped = "another pruner holds the lock"
                self.log.info("cache_prune_skipped", reason=report.skipped)
                return report
        try:
            plan = self.plan()
            report.entries_before, report.bytes_before = plan.entries_before, plan.bytes_before
            report.entries_after, report.bytes_after = plan.entries_after, plan.bytes_after
            report.victims = plan.victims
            done: list[Victim] = plan.victims
            if not dry_run:
                done = self._delete(plan.victims, report, token)
            for v in done:
                report.removed[v.reason]["entries"] += 1
                report.removed[v.reason]["bytes"] += v.nbytes
        finally:
            if token is not None and self.locks is not None:
                self.locks.unlock(LOCK_NAME, token)
        report.seconds = round(time.perf_counter() - t0, 3)
        if not dry_run:
            self._last_run = self.clock()
            # in the store's own units (what limit_crossed compares), not the plan's
            self._mark = (self.store.count(), self.store.total_bytes())
        flat = {f"{r}_{k}": report.removed[r][k] for r in REASONS for k in ("entries", "bytes")}
        self.log.info("cache_pruned", dry_run=dry_run, policy=report.policy,
                      entries_before=report.entries_before, entries_after=report.entries_after,
                      bytes_before=report.bytes_before, bytes_after=report.bytes_after,
                      removed_entries=sum(v["entries"] for v in report.removed.values()),
                      removed_bytes=sum(v["bytes"] for v in report.removed.values()),
                      deleted=report.deleted, batches=report.batches,
                      max_batch_ms=report.max_batch_ms, seconds=report.seconds,
                      cancelled=report.cancelled, **flat)
        return report

    def _delete(self, victims: list[Victim], report: PruneReport, token: str) -> list[Victim]:
        """Batches of at most ``batch_size`` ids, sized to hold the store about
        ``BATCH_TARGET_MS`` each (a 200-id SQLite delete can take 40 ms on a busy
        2-core box: 21 indexes per row); a short sleep between them."""
        done: list[Victim] = []
        size = min(self.batch_size, 50)
        i = 0
        while i < len(victims):
            if self._cancel.is_set():
                report.cancelled = True
                break
            batch = victims[i:i + size]
            i += len(batch)
            t = time.perf_counter()
            report.deleted += self.store.delete([v.id for v in batch])
            ms = (time.perf_counter() - t) * 1000
            report.batches += 1
            report.max_batch_ms = round(max(report.max_batch_ms, ms), 2)
            done += batch
            if ms > 0:  # damped step toward the target hold time
                size = int(size * math.sqrt(BATCH_TARGET_MS / ms))
            size = max(min(size, self.batch_size), min(BATCH_MIN_IDS, self.batch_size))
            if self.locks is not None:
                self.locks.refresh_lock(LOCK_NAME, token, LOCK_TTL_S)
            time.sleep(self.pause_s)  # yields the GIL and the store to lookups
        return done
