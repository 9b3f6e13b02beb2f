"""A source's fate, decided in one place: ``finish(outcome)``.

Every path a worker takes ends in one ``Outcome``; its ``kind`` names what
happened and its ``fate`` what becomes of the source:

* ``DELIVER`` (exact, pixel, near, miss, up_to_date): every output is written;
  the source is kept, moved to ``done/`` or deleted (``after_success``).
* ``FAIL`` (failed): the source goes to ``failed/`` with a ``.error.json``
  sidecar saying why (a linked input gets the sidecar only; a link planted in
  the outbox sends it to ``failed/``'s top level).
* ``RETRY`` (retry): left in place; the caller's retry policy schedules it and,
  when it is exhausted, finishes ``outcome.given_up(attempts)``.
* ``REVIEW`` (review: the mask's confidence is below the pair's
  ``review.min_confidence``): the job wrote the outputs to the review folder
  with a sidecar (``daemon.review``); the source stays until the item is
  approved (then ``after_success`` applies) or redone. ``under_review``: a
  rescan met such a source again; it stays too.
* ``WAIT`` (not_ready: empty or still being written): left in place; the settle
  queue re-checks it and, past ``incomplete_timeout_s``, finishes
  ``outcome.timed_out(seconds)``.
* ``WITHDRAW`` (withdrawn: the source was renamed or deleted while it was
  processed): ``outcome.written`` is removed, so no output outlives its source's
  name; the job wrote no ledger record. The new name is a file of its own.

This module is the only writer of ``failed/`` and ``done/`` and the only code
that deletes a source. A new fate is one ``Fate`` member, its kinds in
``FATES`` and one branch in ``finish``, as ``REVIEW`` and ``WITHDRAW`` are.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.fsutil import is_transient
from daemon.nofollow import (LinkedInput, LinkedPathError, move_under, unlink_under,
                             write_failure)

if TYPE_CHECKING:
    from daemon.job import Job

log = structlog.get_logger("rembgd.job")


class Fate(enum.Enum):
    DELIVER = "deliver"
    FAIL = "fail"
    RETRY = "retry"
    WAIT = "wait"
    REVIEW = "review"
    WITHDRAW = "withdraw"


FATES = {"exact": Fate.DELIVER, "pixel": Fate.DELIVER, "near": Fate.DELIVER,
         "miss": Fate.DELIVER, "up_to_date": Fate.DELIVER, "failed": Fate.FAIL,
         "review": Fate.REVIEW, "under_review": Fate.REVIEW,
         "retry": Fate.RETRY, "not_ready": Fate.WAIT, "withdrawn": Fate.WITHDRAW}


@dataclass(frozen=True)
class Outcome:
    job: Job
    kind: str  # a key of FATES: a cache tier (the file was delivered) or what happened instead
    ms: float = 0.0
    error: str | None = None
    reason: str | None = None
    exc: BaseException | None = None
    sha256: str | None = None  # of the source bytes, once read
    written: list[Path] = field(default_factory=list)  # outputs written by this attempt
    detail: str | None = None  # the failed/ sidecar's text (default: ``str(exc)``)
    tier: str | None = None  # where the mask came from (exact, pixel, near, miss), once rendered
    inference_s: float | None = None  # seconds of mask inference (a miss)

    @property
    def fate(self) -> Fate:
        return FATES[self.kind]

    def given_up(self, attempts: int) -> Outcome:
        """The retry policy is exhausted: failed for good, saying what kept failing."""
        return replace(self, kind="failed", reason=self.reason or "transient",
                       detail=f"gave up after {attempts} attempts: {self.error}")

    def timed_out(self, waited_s: float) -> Outcome:
        """Still incomplete after ``waited_s``: failed as incomplete."""
        return replace(self, kind="failed", reason="incomplete",
                       detail=f"still incomplete after {waited_s:g} s: {self.error}")


def os_error_outcome(job: Job, exc: OSError, written: list[Path] | None = None) -> Outcome:
    """A write or move that failed: a link planted on the way fails the file, a transient
    error (full, read-only, gone) is retried, anything else fails it."""
    written = written if written is not None else []
    if isinstance(exc, LinkedPathError):  # never written through
        return Outcome(job, "failed", error=str(exc), reason="linked_folder", exc=exc,
                       written=written)
    if is_transient(exc):
        return Outcome(job, "retry", error=f"{exc.strerror or exc}: {exc.filename or ''}",
                       reason="transient", exc=exc, written=written)
    return Outcome(job, "failed", error=str(exc), reason="io_error", exc=exc, written=written)


def finish(outcome: Outcome) -> Outcome:
    """Do to the source what ``outcome`` says. Returns what happened: ``outcome``, or, when
    moving the source to done/ failed, that failure (already finished)."""
    fate = outcome.fate
    if fate is Fate.DELIVER:
        try:
            _dispose(outcome.job)
        except OSError as exc:
            failure = os_error_outcome(outcome.job, exc, outcome.written)
            return finish(replace(failure, ms=outcome.ms, sha256=outcome.sha256))
    elif fate is Fate.FAIL:
        _fail(outcome)
    elif fate is Fate.WITHDRAW:
        _withdraw(outcome)
    # RETRY and WAIT: the source stays where it is; the caller schedules it again.
    # REVIEW: it stays until a reviewer approves (daemon.review.approve finishes it) or redoes
    return outcome


def _dispose(job: Job) -> None:
    """Keep, move to done/ or delete the source."""
    if job.after_success == "delete":
        try:
            os.unlink(job.src)
        except FileNotFoundError:
            pass
    elif job.after_success == "move" and job.done_dir is not None:
        if job.src.exists():
            move_under(job.src, job.done_dir, job.rel)


def _withdraw(outcome: Outcome) -> None:
    """Remove the outputs written for a source that no longer exists under its name (in
    the outbox, or in the review folder when they were held)."""
    job = outcome.job
    roots = ([job.review.folder(job.outbox)] if job.review is not None else []) + [job.outbox]
    for path in outcome.written:
        root = next(r for r in roots if path.is_relative_to(r))
        try:
            unlink_under(root, path.relative_to(root))
        except OSError as exc:
            log.error("output_not_withdrawn", path=str(path), error=str(exc))


def _fail(outcome: Outcome) -> None:
    """Move the source to failed/ with a sidecar (a linked input is only recorded). A link
    inside failed/ (or, reason ``linked_folder``, in the outbox) is never written
    through: the file goes to failed/'s top level."""
    job = outcome.job
    if job.failed_dir is None:
        return  # report only (one-shot mode)
    exc = outcome.exc or RuntimeError(outcome.error)
    reason = outcome.reason or "internal_error"
    detail = outcome.detail or str(exc)
    move = not isinstance(exc, LinkedInput)
    rel = Path(job.rel.name) if reason == "linked_folder" else job.rel
    try:
        try:
            write_failure(job.src, rel, job.failed_dir, reason=reason, exc=exc,
                          detail=detail, move=move)
        except LinkedPathError as link:
            log.error("failed_dir_link_refused", path=str(job.src), error=str(link),
                      effect="moved to the top of failed/ instead")
            write_failure(job.src, Path(job.rel.name), job.failed_dir, reason=reason, exc=exc,
                          detail=f"{detail}; {link}", move=move)
    except OSError as err:
        log.error("failed_dir_unwritable", path=str(job.src), error=str(err))
