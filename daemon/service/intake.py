"""Intake: a queued path -> admission (one pass of checks) -> Job -> claim -> job.run.

The source's fate is applied by ``daemon.fate.finish`` (inside ``job.run``, or
here for a file the ledger already records as done), always under the source's
claim (``claim_source``: the lock backend's lock and the claim file), which an
Approve on the page takes too; the intake counts the outcome and schedules what
comes next: a wait, a retry or standby.

``Intake.process(item)`` is the public seam the tests drive: it does exactly
what a worker does with one queued path, and returns what happened: the job's
``Kind``, or ``Deferred`` when no job ran to an outcome.
"""
from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import structlog

from daemon import job as jobmod
from daemon import review
from daemon.cache.base import StoreError
from daemon.coord.claims import claim_source
from daemon.coord.leases import Leases
from daemon.fate import Kind, Outcome, finish
from daemon.fsutil import safe_relative
from daemon.scan import path_ignore_reason
from daemon.service.app import App
from daemon.service.metrics import Metrics
from daemon.service.standby import Standby, is_outage_error
from daemon.service.status import Counters
from daemon.source import Source

log = structlog.get_logger("rembgd.service")


class Deferred(enum.StrEnum):
    """What became of a queued path that no job took to an outcome (counters and logs
    show the value)."""

    SKIPPED = "skipped"  # not work (any more): removed pair, failed admission, redo moot
    STANDBY = "standby"  # its pair's share is out: held until it is back
    CLAIMED_ELSEWHERE = "claimed_elsewhere"  # another daemon holds its claim: queued again
    VANISHED = "vanished"  # gone once claimed
    WAITING = "waiting"  # still being written: checked again later


@dataclass(frozen=True)
class WorkItem:
    pair: str  # the pair's key (``WatchPair.key``): stable across reloads
    path: Path
    attempt: int = 0
    model: str | None = None  # a reviewer's redo: this model, delivered whatever its score


@dataclass(frozen=True)
class Admitted:
    rel: Path
    st: os.stat_result


class Intake:
    def __init__(self, app: Callable[[], App], counters: Counters, retry, later, scheduler,
                 standby: Standby, metrics: Metrics | None = None):
        """``retry(item, outcome)`` applies the retry policy (True: it gave up);
        ``later(item, delay)`` re-queues a path without counting an attempt (claimed
        elsewhere); ``scheduler.standby(...)`` holds it while its pair is on standby;
        ``scheduler.not_ready(pair, path)`` keeps an incomplete file
        waiting."""
        self._app = app
        self.counters = counters
        self.metrics = metrics
        self.listeners: list[Callable[[str, Outcome], None]] = []  # (pair key, outcome)
        self._retry = retry
        self._later = later
        self.scheduler = scheduler
        self.standby = standby

    def admit(self, inbox: Path, path: Path, ignore: tuple[str, ...]) -> Admitted | None:
        """Every check a path must pass before it is work, once; None (logged) if not."""
        try:
            rel = safe_relative(path, inbox)
        except ValueError:
            log.warning("skipped", path=str(path), reason="outside the inbox")
            return None
        why = path_ignore_reason(rel, ignore)
        if why is not None:
            log.info("ignored", path=str(path), reason=why)
            return None
        try:
            st = path.lstat()
        except FileNotFoundError:
            self.counters.add(Deferred.VANISHED)
            log.info("skipped", path=str(path), reason="vanished before processing")
            return None
        reason = None
        if stat.S_ISLNK(st.st_mode):
            reason = "symbolic link; links are never followed"
        elif Path(os.path.realpath(path.parent)) != inbox / rel.parent:
            reason = "symbolic link in its folder path; links are never followed"
        elif stat.S_ISDIR(st.st_mode):
            return None  # a folder's files come through its own events and scans
        elif not stat.S_ISREG(st.st_mode):  # reading a FIFO could block; devices, sockets...
            reason = "not a regular file (FIFO, socket or device); left in place"
        if reason is not None:
            self.counters.add(Deferred.SKIPPED)
            log.warning("skipped", path=str(path), reason=reason)
            return None
        return Admitted(rel, st)

    def process(self, item: WorkItem) -> Kind | Deferred:
        """What a worker does with one queued path; returns what became of it."""
        app = self._app()
        pair = app.pair(item.pair)
        if pair is None:
            return Deferred.SKIPPED  # a reload removed the pair
        if self._on_standby(item, app):
            return Deferred.STANDBY
        admitted = self.admit(pair.inbox, item.path, app.cfg.ignore)
        if admitted is None:
            return Deferred.SKIPPED
        plan = app.plan(item.pair)
        job = jobmod.Job.for_pair(pair, admitted.rel, plan, ledger=app.ledgers[item.pair],
                                  wait_incomplete=True, make_outbox=False)
        held_route = job.review
        if item.model is not None:  # a reviewer's redo: never held again, and processed
            # although the ledger records the file (it was, when it was held)
            plan = replace(plan, options=replace(plan.options, model=item.model))
            route = replace(held_route, min_confidence=0.0) if held_route is not None else None
            job = replace(job, source=job.source.routed(route), plan=plan)
        try:
            lease = self.claim(job.source, app)
        except OSError as exc:  # the claim file cannot be written (full or read-only outbox)
            outcome = Outcome(job.source, Kind.RETRY, error=str(exc), reason="transient", exc=exc)
            return self._transient(item, outcome, app)
        if lease is None:
            self.counters.add(Deferred.CLAIMED_ELSEWHERE)
            self._later(item, app.cfg.store.claim_ttl_s / 2)
            return Deferred.CLAIMED_ELSEWHERE
        try:
            try:
                st = item.path.lstat()
            except FileNotFoundError:
                self.counters.add(Deferred.VANISHED)
                return Deferred.VANISHED
            if item.model is not None and held_route is not None and not review.is_waiting(
                    held_route.folder(pair.outbox), admitted.rel):
                log.info("review_redo_cancelled", path=str(item.path), model=item.model,
                         why="approved or delivered before the redo began")
                self.counters.add(Deferred.SKIPPED)
                return Deferred.SKIPPED
            if item.model is None and self.is_done(job, st):  # e.g. killed after writing,
                log.debug("up_to_date", path=str(item.path),  # before moving; or elsewhere
                          reason="the ledger records this very file as processed")
                outcome = self._finish_done(job)
            else:
                outcome = jobmod.run(job, app.pipeline, umask=app.cfg.umask)
        finally:
            lease.release()
        return self._account(item, outcome, app)

    def claim(self, source: Source, app: App | None = None) -> Leases | None:
        """Claim ``source``'s fate with the running config's locks (the page's Approve
        takes the same claim)."""
        app = app or self._app()
        return claim_source(app.locks, source, app.cfg.store.claim_ttl_s,
                            on_fallback=lambda exc: self._claim_fallback(exc, app))

    @staticmethod
    def _finish_done(job: jobmod.Job) -> Outcome:
        """A file the ledger records as processed: finished now (e.g. killed after writing,
        before moving), unless its cutout waits for review: then its fate is the reviewer's."""
        if job.review is not None and review.is_waiting(job.source.review_folder, job.rel):
            return Outcome(job.source, Kind.UNDER_REVIEW)
        return finish(Outcome(job.source, Kind.UP_TO_DATE))

    def _claim_fallback(self, exc: StoreError, app: App) -> None:
        """The lock backend failed and the claim file stood in: one more sign of a cache
        outage, for the guard to report."""
        self.counters.add("claim_fallbacks")
        app.cache.guard.failed(exc)

    def _account(self, item: WorkItem, outcome: Outcome, app: App) -> Kind | Deferred:
        """Count a finished outcome and schedule what comes next (a wait, a retry)."""
        if outcome.kind is Kind.NOT_READY:
            return self._not_ready(item, outcome)
        self.scheduler.ready(item.path)
        if outcome.kind is Kind.RETRY:
            return self._transient(item, outcome, app)
        self.counters.add(outcome.kind)
        self._measure(item, outcome, app)
        for listener in self.listeners:
            listener(item.pair, outcome)
        return outcome.kind

    def _measure(self, item: WorkItem, outcome: Outcome, app: App) -> None:
        """The Prometheus counters of a finished outcome (labelled by the pair's inbox)."""
        if self.metrics is None:
            return
        pair = str(app.pair(item.pair).inbox)
        if outcome.kind is Kind.FAILED:
            self.metrics.failed(pair, outcome.reason or "internal_error")
        elif outcome.tier is not None:  # delivered or held for review, not up_to_date
            self.metrics.processed(pair, outcome.tier, outcome.ms / 1000)
            if outcome.kind is Kind.REVIEW:
                self.metrics.reviewed(pair)
        if outcome.inference_s is not None:
            self.metrics.inference(outcome.inference_s)

    def is_done(self, job: jobmod.Job, st: os.stat_result, *, hash_source: bool = True) -> bool:
        """The ledger says this very file (size, mtime, ctime, inode) was processed (a
        reload's new deliverables apply to files that arrive or change after it);
        without a trustworthy record, its outputs' stamps must name its sha256
        (``hash_source`` False: not checked here, see ``Ledger.vouch``)."""
        state = job.ledger.state(job.rel, st)
        if state != "unknown":
            return state == "done"
        return job.ledger.vouch(job.rel, st, job.src,
                                [job.output_rel(n) for n in job.output_names],
                                hash_source=hash_source)

    def _on_standby(self, item: WorkItem, app: App) -> bool:
        """A pair on standby, or whose outbox or inbox is gone, waits (checked again)."""
        pair = app.pair(item.pair)
        if not self.standby.active(item.pair) and pair.outbox.is_dir() and pair.inbox.is_dir():
            return False
        delay = self.standby.check(pair)
        if delay is None:
            return False
        self._wait_standby(item, delay)
        return True

    def _wait_standby(self, item: WorkItem, delay: float) -> None:
        """Back at the pair's next probe, or sooner: ``SettleQueue.wake`` when it is back."""
        self.counters.add("standby_waits")
        self.scheduler.standby(item.pair, item.path, item.attempt, delay, item.model)

    def _transient(self, item: WorkItem, outcome: Outcome, app: App) -> Kind | Deferred:
        """A share outage puts the pair on standby (no attempt counted); a fault of this
        one file goes through the retry policy."""
        if is_outage_error(outcome.exc):
            delay = self.standby.check(app.pair(item.pair))
            if delay is not None:
                self._wait_standby(item, delay)
                return Deferred.STANDBY
        if self._retry(item, outcome):  # given up: failed for good
            self._measure(item, outcome.given_up(item.attempt + 1), app)
        return Kind.RETRY

    def _not_ready(self, item: WorkItem, outcome: Outcome) -> Kind | Deferred:
        """Empty, truncated or still changing: wait (with backoff) up to
        ``incomplete_timeout_s``, then fail it as incomplete."""
        if self.scheduler.not_ready(item.pair, item.path):
            self.counters.add(Deferred.WAITING)
            return Deferred.WAITING
        self.counters.add(Kind.FAILED)
        failed = finish(outcome.timed_out(self.scheduler.incomplete_timeout_s))
        self._measure(item, failed, self._app())
        return Kind.FAILED
