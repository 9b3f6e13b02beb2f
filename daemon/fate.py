"""A source's fate, decided in one place: ``finish(outcome)``.

Every path a worker takes ends in one ``Outcome``; its ``kind`` names what
happened and its ``fate`` what becomes of the source:

* ``DELIVER`` (exact, pixel, near, miss, up_to_date): every output is written;
  a cutout of it still held for review is dropped (a redo delivered it), and
  the source is kept, moved to ``done/`` or deleted (``after_success``).
* ``FAIL`` (failed): the source goes to ``failed/`` with a ``.error.json``
  sidecar saying why (a linked input gets the sidecar only; a link planted in
  the outbox sends it to ``failed/``'s top level).
* ``RETRY`` (retry): left in place; the caller's retry policy schedules it and,
  when it is exhausted, finishes ``outcome.given_up(attempts)``.
* ``REVIEW`` (review: the mask's confidence is below the pair's
  ``review.min_confidence``): the job wrote the outputs to the review folder;
  ``finish`` records the held item (``outcome.held``, its sidecar, through
  ``daemon.review``); the source stays until the item is approved
  (``daemon.verdict``; then ``after_success`` applies) or redone.
  ``under_review``: a rescan met such a source again; it stays too.
* ``WAIT`` (not_ready: empty or still being written): left in place; the settle
  queue re-checks it and, past ``incomplete_timeout_s``, finishes
  ``outcome.timed_out(seconds)``.
* ``WITHDRAW`` (withdrawn: the source was renamed or deleted while it was
  processed): ``outcome.written`` is removed, so no output outlives its source's
  name, but only each file that is still the one this job wrote (its inode,
  size and mtime): what another actor delivered meanwhile under that name is
  never removed. The job wrote no ledger record. The new name is a file of its
  own.

This module is the only writer of ``failed/`` and ``done/``, of the review
sidecars a job leaves, and the only code that deletes a source. It takes a
``daemon.source.Source``, never the job: the caller holds the source's claim
(``daemon.coord.claims.claim_source``), so one owner decides its fate at a time. A new fate is one ``Fate`` member, its kinds (``Kind``) in
``FATES`` and one branch in ``finish``, as ``REVIEW`` and ``WITHDRAW`` are.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from daemon import review
from daemon.cache.base import Tier
from daemon.fsutil import is_transient
from daemon.nofollow import (LinkedInput, LinkedPathError, move_under, unlink_under,
                             write_failure)
from daemon.source import Source

log = structlog.get_logger("rembgd.job")


class Fate(enum.Enum):
    DELIVER = "deliver"
    FAIL = "fail"
    RETRY = "retry"
    WAIT = "wait"
    REVIEW = "review"
    WITHDRAW = "withdraw"


class Kind(enum.StrEnum):
    """What happened to a source: a cache tier (it was delivered) or what happened
    instead (a ``str``: logs, counters and JSON show the value)."""

    EXACT = Tier.EXACT.value
    PIXEL = Tier.PIXEL.value
    NEAR = Tier.NEAR.value
    MISS = Tier.MISS.value
    UP_TO_DATE = "up_to_date"  # the ledger or the outputs' stamps vouch for it
    FAILED = "failed"
    RETRY = "retry"
    REVIEW = "review"  # held: confidence below review.min_confidence
    UNDER_REVIEW = "under_review"  # a rescan met a held source
    NOT_READY = "not_ready"  # empty or still being written
    WITHDRAWN = "withdrawn"  # renamed or deleted mid-job

    @property
    def tier(self) -> Tier | None:
        """The cache tier a delivered cutout came from; None for every other kind."""
        return Tier.named(self.value)


FATES = {Kind.EXACT: Fate.DELIVER, Kind.PIXEL: Fate.DELIVER, Kind.NEAR: Fate.DELIVER,
         Kind.MISS: Fate.DELIVER, Kind.UP_TO_DATE: Fate.DELIVER, Kind.FAILED: Fate.FAIL,
         Kind.REVIEW: Fate.REVIEW, Kind.UNDER_REVIEW: Fate.REVIEW,
         Kind.RETRY: Fate.RETRY, Kind.NOT_READY: Fate.WAIT, Kind.WITHDRAWN: Fate.WITHDRAW}
assert set(FATES) == set(Kind), "every kind has a fate"


Identity = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) of a written file


def identity(path: Path) -> Identity:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Outcome:
    source: Source
    kind: Kind  # a cache tier (the file was delivered) or what happened instead
    ms: float = 0.0
    error: str | None = None
    reason: str | None = None
    exc: BaseException | None = None
    sha256: str | None = None  # of the source bytes, once read
    written: list[Path] = field(default_factory=list)  # outputs written by this attempt
    detail: str | None = None  # the failed/ sidecar's text (default: ``str(exc)``)
    tier: Tier | None = None  # where the mask came from, once rendered
    inference_s: float | None = None  # seconds of mask inference (a miss)
    model: str | None = None  # the mask model it was rendered with
    held: review.ReviewItem | None = None  # kind review: the item to record
    identities: dict[Path, Identity] = field(default_factory=dict)  # of ``written``, as written
    source_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the source it was made from

    def __post_init__(self) -> None:  # a tier, or a kind's value, names its Kind
        object.__setattr__(self, "kind", Kind(self.kind))

    @property
    def fate(self) -> Fate:
        return FATES[self.kind]

    def given_up(self, attempts: int) -> Outcome:
        """The retry policy is exhausted: failed for good, saying what kept failing."""
        return replace(self, kind=Kind.FAILED, reason=self.reason or "transient",
                       detail=f"gave up after {attempts} attempts: {self.error}")

    def timed_out(self, waited_s: float) -> Outcome:
        """Still incomplete after ``waited_s``: failed as incomplete."""
        return replace(self, kind=Kind.FAILED, reason="incomplete",
                       detail=f"still incomplete after {waited_s:g} s: {self.error}")


def os_error_outcome(source: Source, exc: OSError, written: list[Path] | None = None
                     ) -> Outcome:
    """A write or move that failed: a link planted on the way fails the file, a transient
    error (full, read-only, gone) is retried, anything else fails it."""
    written = written if written is not None else []
    if isinstance(exc, LinkedPathError):  # never written through
        return Outcome(source, Kind.FAILED, error=str(exc), reason="linked_folder", exc=exc,
                       written=written)
    if is_transient(exc):
        return Outcome(source, Kind.RETRY, error=f"{exc.strerror or exc}: {exc.filename or ''}",
                       reason="transient", exc=exc, written=written)
    return Outcome(source, Kind.FAILED, error=str(exc), reason="io_error", exc=exc,
                   written=written)


def finish(outcome: Outcome) -> Outcome:
    """Do to the source what ``outcome`` says. Returns what happened: ``outcome``, or, when
    moving the source to done/ (or recording its held item) failed, that failure (already
    finished)."""
    fate = outcome.fate
    try:
        if fate is Fate.DELIVER:
            _drop_held(outcome.source)
            _dispose(outcome.source, outcome.source_id)
        elif fate is Fate.REVIEW and outcome.held is not None:
            review.hold(outcome.source.review_folder, outcome.held)
    except OSError as exc:
        failure = os_error_outcome(outcome.source, exc, outcome.written)
        return finish(replace(failure, ms=outcome.ms, sha256=outcome.sha256,
                              model=outcome.model, identities=outcome.identities))
    if fate is Fate.FAIL:
        _fail(outcome)
    elif fate is Fate.WITHDRAW:
        _withdraw(outcome)
    # RETRY and WAIT: the source stays where it is; the caller schedules it again.
    # REVIEW: it stays until a reviewer approves (daemon.verdict.approve finishes it) or redoes
    return outcome


def _drop_held(source: Source) -> None:
    """Delivered (a redo, or new content): a cutout of it held before is done with."""
    if source.review is None:
        return
    try:
        review.drop_for(source.review_folder, source.rel, "delivered to the outbox")
    except review.ReviewError as exc:  # an unreadable sidecar: the page lists it, logged
        log.warning("review_not_dropped", path=str(source.src), error=str(exc))


def _dispose(source: Source, made_from: tuple[int, int] | None = None) -> None:
    """Keep, move to done/ or delete the source; with ``made_from`` (st_dev, st_ino), only
    while it is still that file: one renamed over it meanwhile is new work, left in place."""
    if source.after_success == "keep":
        return
    if made_from is not None:
        try:
            st = os.lstat(source.src)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != tuple(made_from):
            log.warning("source_replaced", path=str(source.src),
                        effect="left in place: it is processed as a new file")
            return
    if source.after_success == "delete":
        try:
            os.unlink(source.src)
        except FileNotFoundError:
            pass
    elif source.after_success == "move" and source.done_dir is not None:
        if source.src.exists():
            move_under(source.src, source.done_dir, source.rel)


def _withdraw(outcome: Outcome) -> None:
    """Remove the outputs written for a source that no longer exists under its name (in
    the outbox, or in the review folder when they were held): each one only while it is
    still the very file this job wrote."""
    source = outcome.source
    roots = [r for r in (source.review_folder, source.outbox) if r is not None]
    for path in outcome.written:
        root = next(r for r in roots if path.is_relative_to(r))
        mine = outcome.identities.get(path)
        try:
            if mine is None or not unlink_under(root, path.relative_to(root), only=mine):
                log.warning("output_kept", path=str(path), source=str(source.src),
                            why="another writer replaced it after this job wrote it"
                            if mine is not None else "not known to be this job's")
        except OSError as exc:
            log.error("output_not_withdrawn", path=str(path), error=str(exc))


def _fail(outcome: Outcome) -> None:
    """Move the source to failed/ with a sidecar (a linked input is only recorded). A link
    inside failed/ (or, reason ``linked_folder``, in the outbox) is never written
    through: the file goes to failed/'s top level."""
    source = outcome.source
    if source.failed_dir is None:
        return  # report only (one-shot mode)
    exc = outcome.exc or RuntimeError(outcome.error)
    reason = outcome.reason or "internal_error"
    detail = outcome.detail or str(exc)
    move = not isinstance(exc, LinkedInput)
    rel = Path(source.rel.name) if reason == "linked_folder" else source.rel
    try:
        try:
            write_failure(source.src, rel, source.failed_dir, reason=reason, exc=exc,
                          detail=detail, move=move)
        except LinkedPathError as link:
            log.error("failed_dir_link_refused", path=str(source.src), error=str(link),
                      effect="moved to the top of failed/ instead")
            write_failure(source.src, Path(source.rel.name), source.failed_dir, reason=reason,
                          exc=exc, detail=f"{detail}; {link}", move=move)
    except OSError as err:
        log.error("failed_dir_unwritable", path=str(source.src), error=str(err))
