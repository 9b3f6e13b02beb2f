"""One source file, end to end: the only writer of the outbox, ``failed/`` and ``done/``.

safe read (no links, no FIFOs, never outside the inbox) -> pipeline -> atomic
write of every deliverable -> dispose of the source (keep, move to done/, delete)
only once all of them are written. A bad input goes to ``failed/`` with a
sidecar saying why (and which deliverable failed); a transient error is
reported as ``retry`` for the caller's retry policy, which gives up through
:func:`give_up`.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.fsutil import NAME_MAX, is_transient, name_bytes, output_mode, output_name
from daemon.nofollow import (LinkedPathError, atomic_write_under, move_under,
                             unlink_under, write_failure)
from daemon.imaging.decode import DecodeError, TruncatedImage
from daemon.inference.models import ModelError
from daemon.ledger import Ledger
from daemon.pipeline import Pipeline, Plan

log = structlog.get_logger("rembgd.job")


class InputError(ValueError):
    """The input is not a processable regular file (symlink, FIFO, folder...)."""

    reason = "not_a_file"


class LinkedInput(InputError):
    """The path leads through a symbolic link; never followed, and never moved to failed/."""

    reason = "symlink"


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
    src: Path
    rel: Path  # relative to the inbox; mirrored in the outbox
    outbox: Path
    plan: Plan
    failed_dir: Path | None = None  # None: report only (one-shot mode)
    done_dir: Path | None = None
    after_success: str = "keep"
    ledger: Ledger | None = None  # what was processed, so a changed source is redone
    wait_incomplete: bool = False  # an empty or truncated file is "not_ready", not failed
    make_outbox: bool = True  # False (the daemon): a vanished outbox is an outage, not re-made

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


@dataclass
class Outcome:
    job: Job
    outcome: str  # exact|pixel|near|miss|failed|retry|not_ready|vanished
    ms: float
    error: str | None = None
    reason: str | None = None
    exc: BaseException | None = None
    sha256: str | None = None
    written: list[Path] = field(default_factory=list)


def run(job: Job, pipeline: Pipeline, *, umask: int = 0o022) -> Outcome:
    """Process one file end to end. Never raises for a bad input; ModelError propagates."""
    start = time.perf_counter()

    def done(outcome: str, **kw) -> Outcome:
        ms = (time.perf_counter() - start) * 1000
        res = Outcome(job, outcome, ms, **kw)
        if outcome == "not_ready":  # not processed: it is waited for
            log.info("not_ready", path=str(job.src), error=kw.get("error"))
            return res
        level = log.warning if outcome in ("failed", "retry") else log.info
        level("processed", path=str(job.src), outcome=outcome, ms=round(ms, 1),
              model=job.plan.options.model, **({"error": kw["error"]} if kw.get("error") else {}))
        return res

    written: list[Path] = []
    try:
        for out in job.outputs:  # checked first: no work can be saved
            if name_bytes(out.name) > NAME_MAX:
                raise NameTooLong(f"the output name would be {name_bytes(out.name)} bytes, over "
                                  f"the file system's limit of {NAME_MAX}; rename the file")
        st = os.lstat(job.src)
        data = read_regular_file(job.src, root=job.src.parents[len(job.rel.parts) - 1])
        if not data and job.wait_incomplete:
            return done("not_ready", error="empty file (0 bytes)", reason="incomplete")
        rendered = pipeline.render(data, job.plan, defer_store=True)
        errors = dict(rendered.errors)  # deliverable -> why it is missing
        for name, payload in rendered.files.items():
            try:
                written.append(atomic_write_under(job.outbox, job.output_rel(name), payload,
                                                  mode=output_mode(umask),
                                                  make_root=job.make_outbox))
            except OSError as exc:
                # the legacy PNG, a transient error or a link: the whole file, as before
                if not name or is_transient(exc) or isinstance(exc, LinkedPathError):
                    raise
                errors[name] = exc  # this deliverable only: the others are still written
        rendered.store()  # the cache copy of the outputs: after the files, off the latency
        now = signature(job.src)
        if now is None:  # renamed or deleted meanwhile: no output may outlive its name
            withdraw(job, written)
            return done("vanished", reason="vanished", error="renamed or deleted while it "
                        "was processed; its outputs were removed")
        if now != _sig(st):
            for path in written:  # older than the new content: redone, never taken as done
                os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns))
            return done("retry", error="the source changed while it was being processed",
                        reason="changed", written=written)
        if job.ledger is not None:
            job.ledger.record(job.rel, st, rendered.sha256,
                              [job.output_rel(n) for n in rendered.files if n not in errors])
        if errors:
            exc = DeliverableFailed(errors)
            fail(job, exc, exc.reason)
            return done("failed", error=str(exc), reason=exc.reason, exc=exc,
                        sha256=rendered.sha256, written=written)
        dispose(job)
        return done(rendered.tier, sha256=rendered.sha256, written=written)
    except (DecodeError, InputError) as exc:
        reason = getattr(exc, "reason", "undecodable")
        if job.wait_incomplete and isinstance(exc, DecodeError) and (
                isinstance(exc, TruncatedImage) or signature(job.src) not in (_sig(st), None)):
            return done("not_ready", error=str(exc), reason="incomplete", exc=exc)
        fail(job, exc, reason)
        return done("failed", error=str(exc), reason=reason, exc=exc)
    except ModelError:
        raise  # not the file's fault: the caller stops or refuses, naming the fix
    except LinkedPathError as exc:  # a link planted in the outbox or done/: never written through
        fail(job, exc, "linked_folder", top_level=True)
        return done("failed", error=str(exc), reason="linked_folder", exc=exc, written=written)
    except OSError as exc:
        if is_transient(exc):
            return done("retry", error=f"{exc.strerror or exc}: {exc.filename or ''}",
                        reason="transient", exc=exc, written=written)
        fail(job, exc, "io_error")
        return done("failed", error=str(exc), reason="io_error", exc=exc, written=written)
    except Exception as exc:  # a bug or an exotic codec failure: keep the daemon alive
        log.exception("unexpected_error", path=str(job.src))
        fail(job, exc, "internal_error")
        return done("failed", error=f"{type(exc).__name__}: {exc}", reason="internal_error",
                    exc=exc)


def withdraw(job: Job, written: list[Path]) -> None:
    """Remove outputs of a source that no longer exists under its name (never published
    as its deliverables; no ledger record)."""
    for path in written:
        try:
            unlink_under(job.outbox, path.relative_to(job.outbox))
        except OSError as exc:
            log.error("output_not_withdrawn", path=str(path), error=str(exc))


def dispose(job: Job) -> None:
    """After success: keep, move to done/ or delete the source."""
    if job.after_success == "delete":
        try:
            os.unlink(job.src)
        except FileNotFoundError:
            pass
    elif job.after_success == "move" and job.done_dir is not None:
        if job.src.exists():
            move_under(job.src, job.done_dir, job.rel)


def fail(job: Job, exc: BaseException, reason: str, detail: str | None = None, *,
         top_level: bool = False) -> None:
    """Move the source to failed/ with a sidecar (a linked input is only recorded). A link
    inside failed/ is never written through: the file goes to failed/'s top level."""
    if job.failed_dir is None:
        return
    detail = detail or str(exc)
    move = not isinstance(exc, LinkedInput)
    rel = Path(job.rel.name) if top_level else job.rel
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


def give_up(job: Job, attempts: int, last: Outcome | None, exc: BaseException | None = None) -> None:
    """The retry policy is exhausted: fail the file for good, saying what kept failing."""
    error = last.error if last is not None else str(exc)
    reason = (last.reason if last is not None else None) or "transient"
    fail(job, (last.exc if last is not None else None) or exc or RuntimeError(error), reason,
         detail=f"gave up after {attempts} attempts: {error}")


def _sig(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced; None if it is gone."""
    try:
        return _sig(os.lstat(path))
    except FileNotFoundError:
        return None


def read_regular_file(path: Path, root: Path | None = None) -> bytes:
    """Read a regular file without following a symlink; refuse FIFOs, folders, devices.

    With ``root``, the file actually opened must lie under it: a folder on the way
    swapped for a symlink after the checks cannot lead the read out of the inbox.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the final component is a symlink
            raise LinkedInput(f"{path} is a symbolic link; links are never followed") from exc
        if exc.errno == errno.EISDIR:
            raise InputError(f"{path} is a directory, not an image") from exc
        if exc.errno == errno.ENXIO:  # a FIFO with no writer
            raise InputError(f"{path} is a FIFO, not a regular file") from exc
        raise
    try:
        if root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the intake's own path check has to do
                real = None
            top = os.path.realpath(root)
            if real is not None and not real.startswith(top.rstrip("/") + "/"):
                raise LinkedInput(f"{path} leads out of {top} through a symbolic link "
                                  f"(to {real}); links are never followed")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
