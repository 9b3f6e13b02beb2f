"""The supervisor's side of the web page: the ``Controller`` and the server's lifecycle.

``Console`` reads the running Supervisor (its current config, standby, workers,
status) and acts on its folders, always link-proof: Retry moves a file from
failed/ back into the inbox, drops its sidecar and queues it like a new file;
Approve and Redo go through ``daemon.verdict`` (Approve under the source's
claim, the one the workers take). ``Web`` starts the server after
READY, restarts it when a reload changes ``web:`` and stops it on shutdown; the
recent-outputs journal it opens is fed from the job outcomes.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import structlog

from daemon import review, verdict
from daemon.config import Config, WatchPair
from daemon.fate import Kind, Outcome
from daemon.fsutil import output_mode
from daemon.inference.models import ModelError, mask_model_path
from daemon.inference.registry import local_specs
from daemon.nofollow import (atomic_write_under, failure_sidecar, failure_sidecars,
                             move_between, read_failure, read_under, unlink_under)
from daemon.pipeline import Plan, Rendered
from daemon.service.intake import WorkItem
from daemon.service.status import status_line
from daemon.web.controller import FailedFile, PairView, RecentOutput, Refused, WaitingFile
from daemon.web.journal import Journal, parse_query
from daemon.web.prefetch import Prefetcher
from daemon.web.server import PREVIEW, PREVIEWS_KEPT, WebServer
from daemon.web.thumbs import Thumbnails

log = structlog.get_logger("rembgd.web")

MAX_FAILED = 200  # listed on the page, newest first
DISMISSED = ".dismissed"  # failed/.dismissed/: failed files moved aside, never deleted


class Console:
    """The ``daemon.web.controller.Controller`` of a running Supervisor."""

    def __init__(self, sup, journal: Journal, prefetch: Prefetcher | None = None):
        self.sup = sup
        self.journal = journal
        self.prefetch = prefetch
        self._preparing_lock = threading.Lock()
        self._preparing = False  # a source being put on the workbench

    def _pair(self, key: str) -> WatchPair:
        """The running config's pair whose ``WatchPair.key`` is ``key``, wherever a reload
        put it in the list (FileNotFoundError: none, e.g. a reload removed it)."""
        pair = next((p for p in self.sup.cfg.watch if p.key == key), None)
        if pair is None:
            raise FileNotFoundError(f"no pair {key!r} in the running config")
        return pair

    # ----------------------------------------------------------- reading

    def snapshot(self) -> dict:
        st = self.sup.status()
        busy = self.sup.workers.busy_paths()
        pairs = []
        for p in self.sup.cfg.watch:
            outage = st["standby"].get(p.key)
            if outage is not None:
                state, why = "standby", outage["reason"]
            elif any(p.inbox in path.parents for path in busy):
                state, why = "busy", None
            else:
                state, why = "watching", None
            pairs.append(PairView(p.key, str(p.inbox), str(p.outbox), state, why))
        # the page shows the queue beside the line, as what is there now
        return {"pairs": pairs, "queued": st["queued"], "in_progress": st["in_progress"],
                "line": status_line(st["state"], st["counters"], 0), "cache": st["cache"]}

    def recent_outputs(self, limit: int) -> list[RecentOutput]:
        return self.journal.last(limit)

    def search_outputs(self, query: str, limit: int, offset: int
                       ) -> tuple[int, list[RecentOutput]]:
        return self.journal.search(parse_query(query), limit, offset)

    def output(self, row: int) -> RecentOutput | None:
        return self.journal.get(row)

    def latest_output(self, pair: str, source_rel: str) -> RecentOutput | None:
        return self.journal.latest_for(pair, source_rel)

    def failed_files(self) -> list[FailedFile]:
        """The newest ``MAX_FAILED`` (by sidecar mtime: only those sidecars are read)."""
        pairs = self.sup.cfg.watch
        sidecars = sorted(((mtime, i, sidecar) for i, p in enumerate(pairs)
                           for mtime, sidecar in failure_sidecars(p.failed_dir)),
                          key=lambda s: s[0], reverse=True)
        found = ((pairs[i], read_failure(pairs[i].failed_dir, sidecar))
                 for _, i, sidecar in sidecars[:MAX_FAILED])
        return [FailedFile(p.key, f.rel.as_posix(), f.reason, f.error, f.unix_time)
                for p, f in found if f is not None]

    def waiting_files(self) -> list[WaitingFile]:
        inboxes = sorted(self.sup.cfg.watch, key=lambda p: -len(p.inbox.parts))
        now = time.time()
        found = []
        for path, left, checks in self.sup.scheduler.waiting():
            pair = next((p for p in inboxes if p.inbox in path.parents), None)
            if pair is not None:  # else its pair went away in a reload
                rel = path.relative_to(pair.inbox)
                found.append(WaitingFile(pair.key, str(rel), now + max(left, 0.0), checks))
        return found

    def review_items(self) -> list[review.ReviewItem]:
        items = [item for p in self.sup.cfg.watch
                 for item in review.list_items(review.review_dir(p))]
        return sorted(items, key=lambda item: -item.created)

    def roots(self, pair: str) -> dict[str, Path]:
        p = self._pair(pair)
        roots = {"outbox": p.outbox, "failed": p.failed_dir, "inbox": p.inbox,
                 "review": review.review_dir(p)}
        if p.after_success == "move":
            roots["done"] = p.done_dir
        return roots

    def models(self) -> list[str]:
        models_dir = self.sup.cfg.models_dir
        return [s.name for s in local_specs() if mask_model_path(models_dir, s.name).is_file()]

    def metrics(self) -> tuple[bytes, str]:
        return self.sup.metrics.render()

    # ----------------------------------------------------------- actions

    def retry(self, pair: str, rel: str) -> Path:
        p = self._pair(pair)
        rel_path = Path(rel)
        landed = move_between(p.failed_dir, rel_path, p.inbox, rel_path)
        unlink_under(p.failed_dir, failure_sidecar(rel_path))
        self.sup.scheduler.settle(pair, landed, complete=True)  # a poller may see it late
        return landed

    def approve(self, pair: str, item_id: str) -> list[Path]:
        p = self._pair(pair)
        with _review_errors():
            item = review.get(review.review_dir(p), item_id)
            moved = verdict.approve(p, item_id, claim=self.sup.intake.claim)
        self._journal(pair, item.source_rel, moved, "approved", item.tier, item.model,
                      item.confidence, item.reasons)
        return moved

    def dismiss(self, pair: str, rel: str) -> Path:
        p = self._pair(pair)
        rel_path = Path(rel)
        if rel_path.parts[0] == DISMISSED:
            raise Refused(f"{rel} is already dismissed")
        aside = Path(DISMISSED) / rel_path
        landed = move_between(p.failed_dir, rel_path, p.failed_dir, aside)
        sidecar = failure_sidecar(rel_path)
        try:
            move_between(p.failed_dir, sidecar, p.failed_dir, aside.parent / sidecar.name)
        except FileNotFoundError:
            pass
        return landed

    # ----------------------------------------------------------- touch-up

    def touchup(self, pair: str, source_root: str, source_rel: str, strokes: list) -> list[Path]:
        p, data, app = self._source(pair, source_root, source_rel)
        rendered = app.pipeline.touch_up(data, Plan(p.options, p.outputs), strokes)
        return self._deliver(pair, Path(source_rel), rendered, "touched-up")

    def prepare(self, pair: str, source_root: str, source_rel: str) -> None:
        """The source put on the pipeline's workbench on a thread of its own, one at a
        time (another meanwhile is skipped: its touch-up then reads the source itself)."""
        p, data, app = self._source(pair, source_root, source_rel)
        plan = Plan(p.options, p.outputs)
        with self._preparing_lock:
            if self._preparing:
                return
            self._preparing = True

        def run() -> None:
            start = time.perf_counter()
            try:
                app.pipeline.prepare_touch_up(data, plan)
                log.info("web_prepared", source=source_rel,
                         ms=round((time.perf_counter() - start) * 1000, 1))
            except Exception as exc:  # the touch-up will say what is wrong, if anything
                log.warning("web_prepare_failed", source=source_rel,
                            error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._preparing_lock:
                    self._preparing = False

        threading.Thread(target=run, name="web-prepare", daemon=True).start()

    def revert(self, pair: str, source_root: str, source_rel: str) -> list[Path]:
        p, data, app = self._source(pair, source_root, source_rel)
        if not app.pipeline.forget_correction(data):
            raise Refused(f"{source_rel} has no touch-up to revert")
        rendered = app.pipeline.render(data, Plan(p.options, p.outputs))
        return self._deliver(pair, Path(source_rel), rendered, "reverted")

    def _source(self, pair: str, source_root: str, source_rel: str):
        p = self._pair(pair)
        roots = self.roots(pair)
        if source_root not in ("inbox", "done") or source_root not in roots:
            raise FileNotFoundError(f"no {source_root} folder for the source")
        app = self.sup.app
        if app is None:
            raise Refused("the daemon is not ready (standby or starting)")
        return p, read_under(roots[source_root], Path(source_rel)), app

    def _deliver(self, pair: str, rel: Path, rendered: Rendered, event: str) -> list[Path]:
        """Write ``rendered`` like a job, under the source's claim (never beside a running
        job, Approve or Redo): atomically; to the review folder and approved into the
        outbox under the same claim when the source's cutout is held, else to the outbox."""
        from daemon.job import Job  # the job imports the pipeline, as this module does

        if rendered.errors:
            raise Refused("; ".join(f"{n or 'png'}: {e}" for n, e in rendered.errors.items()))
        p = self._pair(pair)
        job = Job.for_pair(p, rel, Plan(p.options, p.outputs))
        lease = self.sup.intake.claim(job.source)
        if lease is None:
            raise Refused(f"{rel.as_posix()} is being processed right now; try again when "
                          "it is done")
        try:
            folder = review.review_dir(p)
            held = review.waiting(folder, rel)
            root = folder if held is not None else p.outbox
            mode = output_mode(self.sup.cfg.umask)
            written = [atomic_write_under(root, job.output_rel(name), payload, mode=mode,
                                          make_root=held is not None)
                       for name, payload in rendered.files.items()]
            if held is not None:  # approve takes over the claim and releases it
                claimed, lease = lease, None
                with _review_errors():
                    moved = verdict.approve(p, held.id, claim=lambda _source: claimed)
                self._journal(pair, held.source_rel, moved, event, held.tier, held.model,
                              held.confidence, held.reasons)
                return moved
        finally:
            if lease is not None:
                lease.release()
        self._journal(pair, rel.as_posix(), written, event, rendered.tier, "touch-up", None, ())
        return written

    def _journal(self, pair: str, source_rel: str, paths: list[Path], event: str, tier: str,
                 model: str, confidence: float | None, reasons) -> None:
        p = self._pair(pair)
        source_root = {"keep": "inbox", "move": "done"}.get(p.after_success)
        if event == "approved":  # (a touch-up's view asks for its new previews at once:
            self._prefetch(pair, source_root, source_rel, paths)  # made then, not niced)
        try:
            self.journal.add(RecentOutput(
                time=time.time(), pair=pair, source_root=source_root, source_rel=source_rel,
                outputs=tuple(Path(os.path.relpath(w, p.outbox)).as_posix() for w in paths),
                tier=tier, model=model, ms=0.0, event=event, confidence=confidence,
                reasons=tuple(reasons)))
        except sqlite3.Error as exc:
            log.warning("web_journal_failed", source=source_rel, error=str(exc))

    def redo(self, pair: str, item_id: str, model: str) -> None:
        p = self._pair(pair)
        if model not in self.models():
            raise Refused(f"{model!r} is not an installed model ({', '.join(self.models())})")
        try:
            self.sup.app.engines.preload([model])  # a broken file is refused here, not in a worker
        except ModelError as exc:
            raise Refused(str(exc)) from None
        with _review_errors():
            verdict.redo(p, item_id, model, lambda path, m: self.sup.workers.submit(
                WorkItem(pair, path, model=m)))

    # ----------------------------------------------------------- journal

    def _prefetch(self, pair: str, source_root: str | None, source_rel: str,
                  outputs: list[Path]) -> None:
        """Queue the previews of a source and its outputs (never blocks; the roots are
        the pair's own folders, so a path outside them is skipped)."""
        if self.prefetch is None:
            return
        try:
            roots = self.roots(pair)
        except FileNotFoundError:
            return
        if source_root in roots:
            self.prefetch.want(roots[source_root], Path(source_rel))
        for path in outputs:
            for name in ("outbox", "review"):
                try:
                    rel = Path(path).relative_to(roots[name])
                except ValueError:
                    continue
                self.prefetch.want(roots[name], rel)
                break

    def record(self, pair: str, outcome: Outcome) -> None:
        """A job outcome: a delivered file goes into the recent-outputs journal; its
        previews (and a held cutout's) are made ahead of its first view."""
        if outcome.kind == Kind.REVIEW:
            self._prefetch(pair, "inbox", outcome.source.rel.as_posix(), outcome.written)
        if outcome.kind.tier is None:  # not delivered by this job
            return
        source = outcome.source
        source_root = {"keep": "inbox", "move": "done"}.get(source.after_success)
        self._prefetch(pair, source_root, source.rel.as_posix(), outcome.written)
        entry = RecentOutput(
            time=time.time(), pair=pair, source_root=source_root,
            source_rel=source.rel.as_posix(),
            outputs=tuple(Path(os.path.relpath(w, source.outbox)).as_posix()
                          for w in outcome.written),
            tier=outcome.kind.tier, model=outcome.model or "", ms=round(outcome.ms, 1))
        try:
            self.journal.add(entry)
        except sqlite3.Error as exc:  # the file is delivered; only the page misses it
            log.warning("web_journal_failed", path=str(source.src), error=str(exc))


@contextmanager
def _review_errors() -> Iterator[None]:
    """obs's review errors as the Controller's: no such item (404), or refused (409)."""
    try:
        yield
    except review.NotFound as exc:
        raise FileNotFoundError(str(exc)) from None
    except review.ReviewError as exc:
        raise Refused(str(exc)) from None


class Web:
    """The page's server and journal, following the config's ``web:`` section."""

    def __init__(self, sup):
        self.sup = sup
        self.console: Console | None = None
        self._server: WebServer | None = None
        self._running: tuple | None = None  # (web config, cache dir) being served

    def apply(self, cfg: Config) -> None:
        """Start, restart or stop the server to match ``cfg.web``."""
        wanted = (cfg.web, cfg.cache.dir) if cfg.web is not None else None
        if wanted == self._running:
            return
        self.close()
        if wanted is None:
            return
        state = cfg.cache.dir / "web"
        thumbs = Thumbnails(state / "thumbs")
        previews = Thumbnails(state / "previews", PREVIEW, keep=PREVIEWS_KEPT)
        prefetch = Prefetcher([previews, thumbs])
        console = Console(self.sup, Journal(state / "recent.sqlite"), prefetch)
        server = WebServer(cfg.web, console, thumbs, previews)
        try:
            url = server.start()
        except OSError as exc:
            console.journal.close()
            log.error("web_unavailable", listen=f"{cfg.web.host}:{cfg.web.port}",
                      error=str(exc), effect="no status page; files are still processed")
            return
        prefetch.start()
        self.console, self._server, self._running = console, server, wanted
        log.info("web_listening", url=url, token=cfg.web.token is not None)

    @property
    def url(self) -> str | None:
        return self._server.url if self._server is not None else None

    def record(self, pair: str, outcome: Outcome) -> None:
        if self.console is not None:
            self.console.record(pair, outcome)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            if self.console.prefetch is not None:
                self.console.prefetch.stop()
            self.console.journal.close()
        self.console, self._server, self._running = None, None, None
