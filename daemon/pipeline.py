"""The pipeline: bytes in -> lookup (exact, pixel, near) or inference -> PNG out.

``Pipeline.render_bytes`` is the core; ``Pipeline.handle`` wraps it with the
file-system edge (read, atomic write, failed/ and done/). The daemon and
``rembgd process`` both go through ``handle``.
"""
from __future__ import annotations

import errno
import os
import stat
from contextlib import ExitStack, contextmanager
import uuid
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import structlog

from daemon.imaging import fingerprint as fpmod
from daemon.config import Config, OutputOptions
from daemon.imaging.decode import DecodeError, TruncatedImage, decode
from daemon.inference.engine import Engines
from daemon.fsutil import (NAME_MAX, atomic_write_bytes, is_transient, move_file, name_bytes,
                     output_mode, write_failure)
from daemon.coord.leases import waiting_lease
from daemon.inference.models import ModelError
from daemon.imaging.render import cache_key, decode_mask, encode_mask, encode_png, fit_mask, render
from daemon.cache.base import Entry, Store

log = structlog.get_logger("rembgd.pipeline")


class InputError(ValueError):
    """The input is not a processable regular file (symlink, FIFO, folder...)."""

    reason = "not_a_file"


class LinkedInput(InputError):
    """The path leads through a symbolic link; never followed, and never moved to failed/."""

    reason = "symlink"


class NameTooLong(InputError):
    """The output name (source name + ".png") would exceed NAME_MAX bytes."""

    reason = "name_too_long"


@dataclass
class Rendered:
    png: bytes
    tier: str  # exact | pixel | near | miss
    entry_id: str | None = None
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    src: Path
    rel: Path  # relative to the inbox; mirrored in the outbox
    out: Path  # final output path
    options: OutputOptions
    failed_dir: Path | None = None  # None: report only (one-shot mode)
    done_dir: Path | None = None
    after_success: str = "keep"
    grace_s: float = 0.0  # a truncated file modified this recently may still be being written


@dataclass
class Result:
    job: Job
    outcome: str  # exact|pixel|near|miss|failed|retry|skipped
    ms: float
    error: str | None = None
    reason: str | None = None
    exc: BaseException | None = None


class Pipeline:
    def __init__(self, cfg: Config, engines: Engines, store: Store | None):
        self.cfg = cfg
        self.engines = engines
        self.store = store
        self.store_errors = 0
        self._store_down_logged = False
        self._store_failed_at = 0.0
        self._inflight: dict[str, threading.Event] = {}
        self._inflight_lock = threading.Lock()
        self._keys: dict[OutputOptions, tuple[str, str]] = {}

    # ------------------------------------------------------------ helpers

    def key_for(self, options: OutputOptions) -> tuple[str, str]:
        """(cache key, model md5) for these options; loads the model on first use."""
        if options not in self._keys:
            model = self.engines.mask(options.model).model
            self._keys[options] = (cache_key(options, model.md5), model.md5)
        return self._keys[options]

    @property
    def store_down(self) -> bool:
        """The last store operations failed (the status file shows the cache unavailable)."""
        return self._store_down_logged

    def _store_call(self, fn, *args, default=None):
        """Run a store operation; on failure degrade to no-cache, loudly, once.

        Recovery is declared only after ``store.retry_s`` without a failure: when
        reads work and writes fail (a read-only cache folder), the log would
        otherwise flip between unavailable and recovered on every file.
        """
        if self.store is None or not self.cfg.cache.enabled:
            return default
        try:
            result = fn(*args)
        except Exception as exc:  # sqlite3.Error, OSError, redis errors...
            self._store_failed(exc)
            return default
        if (self._store_down_logged
                and time.monotonic() - self._store_failed_at >= self.cfg.store.retry_s):
            log.warning("cache_recovered")
            self._store_down_logged = False
        return result

    def _store_failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        self._store_failed_at = time.monotonic()
        if not self._store_down_logged:
            log.error("cache_unavailable", error=f"{type(exc).__name__}: {exc}",
                      effect="processing continues without the cache")
            self._store_down_logged = True

    def _blob(self, entry: Entry, digest: str | None) -> bytes | None:
        """A verified blob, or None; a bad blob drops its entry (a miss, repaired by inference)."""
        if digest is None:
            return None
        data = self._store_call(self.store.get_blob, digest) if self.store else None
        if data is None:
            log.warning("cache_blob_invalid", entry=entry.id, digest=digest[:12],
                        effect="entry dropped; counted as a miss")
            self._store_call(self.store.delete, [entry.id])
        return data

    def _record(self, entry_id: str | None, tier: str) -> None:
        if self.store is not None:
            self._store_call(self.store.record, entry_id, tier)

    # --------------------------------------------------------------- core

    def render_bytes(self, data: bytes, options: OutputOptions) -> Rendered:
        key, _ = self.key_for(options)
        store = self.store if self.cfg.cache.enabled else None
        sha = fpmod.sha256_bytes(data)

        if store is not None:  # tier 1: exact bytes, no decode, no encode
            hit = self._store_call(store.find_exact, key, sha)
            if hit is not None and hit.output_digest:
                png = self._blob(hit, hit.output_digest)
                if png is not None:
                    self._record(hit.id, "exact")
                    return Rendered(png, "exact", hit.id)

        decoded = decode(data, max_pixels=self.cfg.max_image_pixels)
        fp = fpmod.fingerprint(data, decoded.rgb)

        if store is None:
            return self._infer(key, options, fp, decoded.rgb, None)

        found, fp = self._lookup_decoded(key, options, fp, decoded.rgb)
        if found is not None:
            return found
        # miss: single flight per (key, pixels), in this process and across processes
        flight = f"flight:{key}:{fp.pixel_hash}"
        with self._inflight_lock:
            event = self._inflight.get(flight)
            leader = event is None
            if leader:
                self._inflight[flight] = event = threading.Event()
        if not leader:
            event.wait(timeout=600)
            found, fp = self._lookup_decoded(key, options, fp, decoded.rgb)
            if found is not None:
                return found
        try:
            with self._flight_lease(store, flight):
                found, fp = self._lookup_decoded(key, options, fp, decoded.rgb)
                if found is not None:
                    return found
                return self._infer(key, options, fp, decoded.rgb, store)
        finally:
            if leader:
                with self._inflight_lock:
                    self._inflight.pop(flight, None)
                event.set()

    @contextmanager
    def _flight_lease(self, store: Store, name: str):
        """Cross-process single flight; best effort: an unreachable store only costs a duplicate."""
        with ExitStack() as stack:
            try:
                stack.enter_context(
                    waiting_lease(store, name, self.cfg.store.claim_ttl_s, timeout=600))
            except Exception as exc:
                self._store_failed(exc)
            yield

    def _lookup_decoded(self, key: str, options: OutputOptions, fp: fpmod.Fingerprint,
                        rgb: np.ndarray) -> tuple[Rendered | None, fpmod.Fingerprint]:
        """Tiers 2 and 3; also returns ``fp`` with its embedding once computed."""
        store = self.store
        hit = self._store_call(store.find_pixel, key, fp.pixel_hash)
        if hit is not None:  # tier 2: same pixels, other bytes
            png = self._blob(hit, hit.output_digest) if hit.output_digest else None
            if png is None and not hit.output_digest:  # outputs not stored: render from the mask
                raw = self._blob(hit, hit.mask_digest)
                if raw is not None:
                    png = encode_png(render(rgb, decode_mask(raw), options),
                                     options.png_compression)
            if png is not None:
                self._record(hit.id, "pixel")
                if self.cfg.cache.store_outputs and fp.sha256 != hit.fp.sha256:
                    self._store_call(self._alias, hit, fp, png)
                return Rendered(png, "pixel", hit.id), fp

        t = self.cfg.cache.match
        cands = self._store_call(store.find_near, key, fp.phash, t.phash_radius, default=[])
        if not cands:
            return None, fp
        if fp.embedding is None:
            fp = _with_embedding(fp, self.engines.embedder().embed(rgb))
        for cand in cands:  # tier 3: verified near-duplicate
            verdict = fpmod.verify(fp, cand.fp, t)
            if not verdict.accepted:
                log.debug("near_rejected", candidate=cand.id, reason=verdict.reason,
                          **verdict.metrics)
                continue
            raw = self._blob(cand, cand.mask_digest)
            if raw is None:
                continue
            mask = fit_mask(decode_mask(raw), fp.width, fp.height)
            png = encode_png(render(rgb, mask, options), options.png_compression)
            self._record(cand.id, "near")
            alias = self._store_call(
                store.put, key, options.model, fp, encode_mask(mask),
                png if self.cfg.cache.store_outputs else None, cand.id)
            return Rendered(png, "near", alias.id if alias else cand.id, verdict.metrics), fp
        return None, fp

    def _alias(self, hit: Entry, fp: fpmod.Fingerprint, png: bytes) -> None:
        """Same pixels, new bytes: an alias row (blobs are shared) makes the next one exact."""
        now = time.time()
        self.store.restore(replace(hit, id=uuid.uuid4().hex, fp=replace(fp, embedding=hit.fp.embedding),
                                   output_digest=self.store.put_blob(png), created=now,
                                   last_hit=now, hits=0, origin=hit.origin or hit.id))

    def _infer(self, key: str, options: OutputOptions, fp: fpmod.Fingerprint, rgb: np.ndarray,
               store: Store | None) -> Rendered:
        mask = self.engines.mask(options.model).predict(rgb)
        png = encode_png(render(rgb, mask, options), options.png_compression)
        entry_id = None
        if store is not None:
            if fp.embedding is None:
                fp = _with_embedding(fp, self.engines.embedder().embed(rgb))
            entry = self._store_call(store.put, key, options.model, fp, encode_mask(mask),
                                     png if self.cfg.cache.store_outputs else None)
            entry_id = entry.id if entry else None
            self._record(None, "miss")
        return Rendered(png, "miss", entry_id)

    # ---------------------------------------------------------- file edge

    def handle(self, job: Job) -> Result:
        """Process one file end to end. Never raises for a bad input."""
        start = time.perf_counter()

        def done(outcome: str, **kw) -> Result:
            ms = (time.perf_counter() - start) * 1000
            res = Result(job, outcome, ms, **kw)
            level = log.warning if outcome in ("failed", "retry") else log.info
            level("processed", path=str(job.src), outcome=outcome, ms=round(ms, 1),
                  model=job.options.model, **({"error": kw["error"]} if kw.get("error") else {}))
            return res

        try:
            if name_bytes(job.out.name) > NAME_MAX:  # checked first: no work can be saved
                raise NameTooLong(f"the output name would be {name_bytes(job.out.name)} bytes, "
                                  f"over the file system's limit of {NAME_MAX}; rename the file")
            before = _signature(job.src)
            data = read_regular_file(job.src, root=job.src.parents[len(job.rel.parts) - 1])
            rendered = self.render_bytes(data, job.options)
            atomic_write_bytes(job.out, rendered.png, mode=output_mode(self.cfg.umask))
            if before is not None and _signature(job.src) not in (before, None):
                # new content arrived meanwhile: the output is older than it, so it is redone
                os.utime(job.out, ns=(before[3], before[3]))
                return done("retry", error="the source changed while it was being processed",
                            reason="changed")
            self.finish_source(job)
            return done(rendered.tier)
        except (DecodeError, InputError) as exc:
            reason = getattr(exc, "reason", "undecodable")
            if isinstance(exc, TruncatedImage) and _modified_within(job.src, job.grace_s):
                return done("retry", error=str(exc), reason="incomplete", exc=exc)
            self._fail(job, exc, reason)
            return done("failed", error=str(exc), reason=reason, exc=exc)
        except ModelError:
            raise  # not the file's fault: the service must stop and say how to fix it
        except OSError as exc:
            if is_transient(exc):
                return done("retry", error=f"{exc.strerror or exc}: {exc.filename or ''}",
                            reason="transient", exc=exc)
            self._fail(job, exc, "io_error")
            return done("failed", error=str(exc), reason="io_error", exc=exc)
        except Exception as exc:  # a bug or an exotic codec failure: keep the daemon alive
            log.exception("unexpected_error", path=str(job.src))
            self._fail(job, exc, "internal_error")
            return done("failed", error=f"{type(exc).__name__}: {exc}", reason="internal_error",
                        exc=exc)

    def finish_source(self, job: Job) -> None:
        if job.after_success == "delete":
            try:
                os.unlink(job.src)
            except FileNotFoundError:
                pass
        elif job.after_success == "move" and job.done_dir is not None:
            if job.src.exists():
                move_file(job.src, job.done_dir / job.rel)

    def _fail(self, job: Job, exc: BaseException, reason: str) -> None:
        if job.failed_dir is None:
            return
        try:
            write_failure(job.src, job.rel, job.failed_dir, reason=reason, exc=exc,
                          detail=str(exc), move=not isinstance(exc, LinkedInput))
        except OSError as err:
            log.error("failed_dir_unwritable", path=str(job.src), error=str(err))


def _with_embedding(fp: fpmod.Fingerprint, emb: np.ndarray) -> fpmod.Fingerprint:
    return replace(fp, embedding=emb)


def _modified_within(path: Path, seconds: float) -> bool:
    if seconds <= 0:
        return False
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced; None if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
            except OSError:  # no /proc: the service's own path check has to do
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
