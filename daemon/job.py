"""One source file, end to end: the only writer of deliverables (the outbox).

safe read (no links, no FIFOs, never outside the inbox) -> pipeline.render ->
atomic write of every deliverable -> commit the cache writes -> the ledger
record -> ``fate.finish``, which keeps, moves or deletes the source once every
output is written, or moves it to ``failed/`` with a sidecar saying why (and
which deliverable failed). A transient error is an ``Outcome`` of kind
``retry`` for the caller's retry policy. On a pair with ``review:``, a cutout
whose mask confidence is below ``min_confidence`` is written to the review
folder instead: kind ``review``, with the item ``fate.finish`` records (its
sidecar), and the source waits for the reviewer.

The job only writes outputs (and the ledger); the caller holds the source's
claim (``daemon.coord.claims.claim_source``) around ``run``.

Who else writes where (docs/architecture.md): ``daemon.fate`` writes
``failed/``, ``done/`` and the review sidecars; ``daemon.review`` (for
``daemon.verdict``) moves held cutouts into the outbox on approval;
``daemon.ledger`` the outbox's ``.rembgd-ledger/``;
``daemon.coord`` the claim files (``.rembgd-claims/``) and lock files; the
standby probe (``daemon.service.standby``) its probe file; the supervisor
removes this daemon's stale temp files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from daemon import review
from daemon.config import WatchPair
from daemon.config.schema import ReviewConfig
from daemon.fate import Kind, Outcome, finish, identity, os_error_outcome
from daemon.fsutil import NAME_MAX, is_transient, name_bytes, output_mode, output_name
from daemon.nofollow import (InputError, LinkedPathError, atomic_write_under,
                             read_regular_file)
from daemon.imaging.decode import DecodeError, TruncatedImage
from daemon.inference.models import ModelError
from daemon.ledger import Ledger
from daemon.pipeline import Pipeline, Plan
from daemon.source import Source

log = structlog.get_logger("rembgd.job")


class NameTooLong(InputError):
    """An output name (source name + extension) would exceed NAME_MAX bytes."""

    reason = "name_too_long"


class DeliverableFailed(RuntimeError):
    """Some deliverables could not be rendered; the others were written."""

    reason = "deliverable_failed"

    def __init__(self, errors: dict[str, BaseException]):
        self.errors = errors
        parts = [f"{name or 'png'}: {type(exc).__name__}: {exc}" for name, exc in errors.items()]
        super().__init__("deliverable failed: " + "; ".join(parts))


@dataclass(frozen=True)
class Job:
    source: Source  # which file, and where its fate takes it
    plan: Plan
    ledger: Ledger | None = None  # what was processed, so a changed source is redone
    wait_incomplete: bool = False  # an empty or truncated file is "not_ready", not failed
    make_outbox: bool = True  # False (the daemon): a vanished outbox is an outage, not re-made

    @classmethod
    def for_pair(cls, pair: WatchPair, rel: Path, plan: Plan, **kw) -> Job:
        """The job of ``pair``'s inbox file ``rel`` (the one place a pair makes a job)."""
        return cls(Source.for_pair(pair, rel), plan, **kw)

    @property
    def src(self) -> Path:
        return self.source.src

    @property
    def rel(self) -> Path:
        return self.source.rel

    @property
    def outbox(self) -> Path:
        return self.source.outbox

    @property
    def review(self) -> ReviewConfig | None:
        return self.source.review

    def output_rel(self, name: str) -> Path:
        """Relative to the outbox: the legacy PNG ``<rel>.png``; a deliverable
        ``<name>/<rel><ext>``."""
        if not name:
            return output_name(self.rel)
        ext = next(d.ext for d in self.plan.outputs if d.name == name)
        return Path(name) / self.rel.with_name(self.rel.name + ext)

    def output_path(self, name: str) -> Path:
        return self.outbox / self.output_rel(name)

    @property
    def output_names(self) -> list[str]:
        return [d.name for d in self.plan.outputs] or [""]

    @property
    def outputs(self) -> list[Path]:
        return [self.output_path(n) for n in self.output_names]


def run(job: Job, pipeline: Pipeline, *, umask: int = 0o022) -> Outcome:
    """Process one file end to end and finish it (``daemon.fate``). Never raises for a
    bad input; ModelError propagates."""
    start = time.perf_counter()
    outcome = _process(job, pipeline, umask)
    outcome = finish(replace(outcome, ms=(time.perf_counter() - start) * 1000,
                             model=job.plan.options.model))
    if outcome.kind is Kind.NOT_READY:  # not processed: it is waited for
        log.info("not_ready", path=str(job.src), error=outcome.error)
        return outcome
    level = log.warning if outcome.kind in (Kind.FAILED, Kind.RETRY) else log.info
    level("processed", path=str(job.src), outcome=outcome.kind, ms=round(outcome.ms, 1),
          model=job.plan.options.model, **({"error": outcome.error} if outcome.error else {}))
    return outcome


def _process(job: Job, pipeline: Pipeline, umask: int) -> Outcome:
    """What happened to ``job``; writes its outputs and the ledger, never touches the source."""
    written: list[Path] = []
    ids: dict[Path, tuple[int, int, int, int]] = {}  # what this job wrote, to withdraw only it
    source = job.source
    try:
        for out in job.outputs:  # checked first: no work can be saved
            if name_bytes(out.name) > NAME_MAX:
                raise NameTooLong(f"the output name would be {name_bytes(out.name)} bytes, over "
                                  f"the file system's limit of {NAME_MAX}; rename the file")
        st = os.lstat(job.src)
        data = read_regular_file(job.src, root=job.src.parents[len(job.rel.parts) - 1])
        if not data and job.wait_incomplete:
            return Outcome(source, Kind.NOT_READY, error="empty file (0 bytes)", reason="incomplete")
        rendered = pipeline.render(data, job.plan)
        errors = dict(rendered.errors)  # deliverable -> why it is missing
        held = review.is_held(job.review, rendered.confidence)
        root = source.review_folder if held else job.outbox
        for name, payload in rendered.files.items():
            try:
                path = atomic_write_under(root, job.output_rel(name), payload,
                                          mode=output_mode(umask),
                                          make_root=held or job.make_outbox)
                written.append(path)
                ids[path] = identity(path)
            except OSError as exc:
                # the legacy PNG, a transient error or a link: the whole file, as before
                if not name or is_transient(exc) or isinstance(exc, LinkedPathError):
                    raise
                errors[name] = exc  # this deliverable only: the others are still written
        if rendered.cache_writes:  # the cache copy of the outputs: after the files
            pipeline.masks.commit(rendered.cache_writes)
        now = signature(job.src)
        if now is None:  # renamed or deleted meanwhile: no output may outlive its name
            return Outcome(source, Kind.WITHDRAWN, reason="vanished", written=written,
                           identities=ids, error="renamed or deleted while it was processed; "
                                                 "its outputs were removed")
        if now != _sig(st):
            for path in written:  # older than the new content: redone, never taken as done
                os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns))
            return Outcome(source, Kind.RETRY, error="the source changed while it was being "
                           "processed", reason="changed", written=written)
        if job.ledger is not None:
            job.ledger.record(job.rel, st, rendered.sha256,
                              [job.output_rel(n) for n in rendered.files if n not in errors])
        if errors:
            exc = DeliverableFailed(errors)
            return Outcome(source, Kind.FAILED, error=str(exc), reason=exc.reason, exc=exc,
                           sha256=rendered.sha256, written=written, identities=ids)
        done = Outcome(source, rendered.tier, sha256=rendered.sha256, written=written,
                       tier=rendered.tier, inference_s=rendered.inference_s, identities=ids,
                       source_id=(st.st_dev, st.st_ino))
        if held:  # fate.finish records the item
            return replace(done, kind=Kind.REVIEW, held=review.new_item(
                str(source.inbox), job.rel, [job.output_rel(n) for n in rendered.files],
                rendered.confidence.score, rendered.confidence.reasons,
                job.plan.options.model, rendered.tier, sha256=rendered.sha256))
        return done
    except (DecodeError, InputError) as exc:
        if job.wait_incomplete and isinstance(exc, DecodeError) and (
                isinstance(exc, TruncatedImage) or signature(job.src) not in (_sig(st), None)):
            return Outcome(source, Kind.NOT_READY, error=str(exc), reason="incomplete", exc=exc)
        return Outcome(source, Kind.FAILED, error=str(exc), reason=getattr(exc, "reason", "undecodable"),
                       exc=exc)
    except ModelError:
        raise  # not the file's fault: the caller stops or refuses, naming the fix
    except OSError as exc:  # a link planted in the outbox, a full disk, a vanished source...
        return os_error_outcome(source, exc, written)
    except Exception as exc:  # a bug or an exotic codec failure: keep the daemon alive
        log.exception("unexpected_error", path=str(job.src))
        return Outcome(source, Kind.FAILED, error=f"{type(exc).__name__}: {exc}",
                       reason="internal_error", exc=exc)


def _sig(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced; None if it is gone."""
    try:
        return _sig(os.lstat(path))
    except FileNotFoundError:
        return None
