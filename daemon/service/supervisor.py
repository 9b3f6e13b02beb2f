"""The long-running service: watchers -> settle -> bounded queue -> workers -> pipeline.

Also: catch-up scan at start, periodic rescans, claims (so several daemons can
share an inbox), retries with backoff, scheduled pruning, sd_notify, SIGTERM
(finish or abandon the current file, never half-write), SIGHUP (reload config;
an invalid one is refused and the old one kept) and the status file.
"""
from __future__ import annotations

import os
import queue
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon import config as configmod
from daemon.service import systemd
from daemon.config import Config, ConfigError, WatchPair
from daemon.imaging.decode import set_max_pixels
from daemon.inference.engine import Engines
from daemon.fsutil import output_name, safe_relative, write_failure
from daemon.coord.leases import FileClaims, Leases, try_lease
from daemon.inference.models import ModelError
from daemon.pipeline import Job, Pipeline, Result
from daemon.cache.prune import Pruner
from daemon.scan import ignored_path, output_is_current, pending, walk
from daemon.service.status import Counters, status_line, write_status
from daemon.cache import open_store
from daemon.service.watcher import InboxHandler, Scheduler, choose_observer, make_observer

log = structlog.get_logger("rembgd.service")

CLAIMS_DIR = ".rembgd-claims"


@dataclass(frozen=True)
class WorkItem:
    pair: WatchPair
    path: Path
    attempt: int = 0


class Service:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.counters = Counters()
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.engines = Engines(cfg.models_dir, cfg.threads)
        self.store = None
        self.store_error: str | None = None
        self.pipeline = Pipeline(cfg, self.engines, None)
        self.queue: queue.Queue[WorkItem | None] = queue.Queue(maxsize=cfg.queue_size)
        self.scheduler = Scheduler(cfg.settle_s, self._submit_index)
        self.workers: list[threading.Thread] = []
        self.observer = None
        self.handlers: list[InboxHandler] = []
        self.in_progress = 0
        self._in_progress_lock = threading.Lock()
        self._active: set[Path] = set()  # paths a worker of this process is on right now
        self.pruner = None
        self._prune_thread: threading.Thread | None = None
        self.started = time.time()
        self.state = "starting"
        self.observer_kind = "none"

    # ------------------------------------------------------------ set-up

    def _open_store(self) -> None:
        if not self.cfg.cache.enabled:
            return
        try:
            self.store = open_store(self.cfg)
        except Exception as exc:  # corrupt index, read-only dir, Redis down at start...
            if self.store_error is None:
                log.error("cache_unavailable", error=f"{type(exc).__name__}: {exc}",
                          effect="processing without the cache; retrying every "
                                 f"{self.cfg.store.retry_s:g}s")
            self.store_error = f"{type(exc).__name__}: {exc}"
            self.store = None
            return
        if self.store_error is not None:
            log.warning("cache_recovered")
        self.store_error = None
        self.pipeline.store = self.store
        self.pruner = self._make_pruner()

    def _make_pruner(self) -> Pruner:
        return Pruner(self.store, self.cfg.cache.limits, self.cfg.cache.prune, log)

    def _start_watching(self) -> None:
        pairs = self.cfg.watch
        kind = choose_observer(self.cfg.observer, [p.inbox for p in pairs])
        self.observer_kind = kind
        observer = make_observer(kind, self.cfg.poll_interval_s)
        self.handlers = []
        for i, pair in enumerate(pairs):
            handler = InboxHandler(i, pair.inbox, pair.recursive, self.cfg.ignore, self.scheduler,
                                   self._scan_dir)
            observer.schedule(handler, str(pair.inbox), recursive=pair.recursive)
            self.handlers.append(handler)
        observer.start()
        self.observer = observer
        log.info("watching", observer=kind, inboxes=[str(p.inbox) for p in pairs])

    def _stop_watching(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def _scan_dir(self, pair_index: int, folder: Path) -> None:
        pair = self.cfg.watch[pair_index]
        for path, _ in walk(folder, pair.recursive, self.cfg.ignore):
            self.scheduler.settle(pair_index, path)

    def rescan(self, *, immediate: bool = False) -> int:
        """Queue every inbox file without an up-to-date output (catch-up and safety net)."""
        n = 0
        for i, pair in enumerate(self.cfg.watch):
            # with move/delete, a file still in the inbox is not finished even when its
            # output is current (killed between writing it and moving the source): _work
            # then only finishes the source
            if pair.after_success == "keep":
                files = pending(pair.inbox, pair.outbox, pair.recursive, self.cfg.ignore)
            else:
                files = walk(pair.inbox, pair.recursive, self.cfg.ignore)
            for path, _ in files:
                if immediate:
                    self._submit(WorkItem(pair, path))
                else:
                    self.scheduler.settle(i, path)
                n += 1
        return n

    # ----------------------------------------------------------- workers

    def _submit_index(self, pair_index: int, path: Path, attempt: int) -> None:
        if pair_index < len(self.cfg.watch):
            self._submit(WorkItem(self.cfg.watch[pair_index], path, attempt))

    def _submit(self, item: WorkItem) -> None:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                self.counters.add("queued_total")
                return
            except queue.Full:
                continue

    def _worker(self) -> None:
        while not self.stop_event.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None or self.stop_event.is_set():
                self.queue.task_done()
                return  # anything still queued stays in the inbox for the next start
            with self._in_progress_lock:
                self.in_progress += 1
                duplicate = item.attempt == 0 and item.path in self._active  # retries pass
                self._active.add(item.path)
            try:
                if duplicate:  # a second event for a file a worker is on: that worker finishes
                    self.counters.add("duplicates")  # it, or retries it if it changed meanwhile
                else:  # (a claim would be refused and retried in claim_ttl_s / 2: "busy")
                    self._work(item)
            except ModelError as exc:
                log.error("model_error", error=str(exc))
                self.stop_event.set()
            except Exception:
                log.exception("worker_error", path=str(item.path))
                self.counters.add("internal_errors")
            finally:
                with self._in_progress_lock:
                    self.in_progress -= 1
                    if not duplicate:
                        self._active.discard(item.path)
                self.queue.task_done()

    def _work(self, item: WorkItem) -> None:
        pair, path = item.pair, item.path
        try:
            rel = safe_relative(path, pair.inbox)
        except ValueError:
            log.warning("skipped", path=str(path), reason="outside the inbox")
            return
        if ignored_path(rel, self.cfg.ignore):
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            self.counters.add("vanished")
            log.info("skipped", path=str(path), reason="vanished before processing")
            return
        if stat.S_ISLNK(st.st_mode):
            self.counters.add("skipped")
            log.warning("skipped", path=str(path), reason="symbolic link; links are never followed")
            return
        if Path(os.path.realpath(path.parent)) != pair.inbox / rel.parent:
            self.counters.add("skipped")
            log.warning("skipped", path=str(path),
                        reason="symbolic link in its folder path; links are never followed")
            return
        if stat.S_ISDIR(st.st_mode):
            return  # a folder's files come through its own events and scans
        if not stat.S_ISREG(st.st_mode):  # reading a FIFO could block; devices, sockets...
            self.counters.add("skipped")
            log.warning("skipped", path=str(path),
                        reason="not a regular file (FIFO, socket or device); left in place")
            return
        job = Job(path, rel, pair.outbox / output_name(rel), pair.options, pair.failed_dir,
                  pair.done_dir, pair.after_success, grace_s=max(5.0, 3 * self.cfg.settle_s))
        if output_is_current(st, job.out):
            self.pipeline.finish_source(job)  # e.g. killed after writing, before moving
            self.counters.add("up_to_date")
            return
        try:
            lease = self._claim(pair, rel)
        except OSError as exc:  # the claim file cannot be written (full or read-only outbox)
            self._retry_or_fail(item, job, Result(job, "retry", 0.0, error=str(exc),
                                                  reason="transient", exc=exc))
            return
        if lease is None:
            self.counters.add("claimed_elsewhere")
            self.scheduler.retry(self._pair_index(pair), path, item.attempt,
                                 self.cfg.store.claim_ttl_s / 2)
            return
        try:
            try:
                st = path.lstat()
            except FileNotFoundError:
                self.counters.add("vanished")
                return
            if output_is_current(st, job.out):  # another daemon finished it meanwhile
                self.pipeline.finish_source(job)
                self.counters.add("up_to_date")
                return
            result = self.pipeline.handle(job)
        finally:
            lease.release()
        if result.outcome == "retry":
            self._retry_or_fail(item, job, result)
            return
        self.counters.add(result.outcome)

    def _claim(self, pair: WatchPair, rel: Path):
        """Claim a file so that no other daemon works on it; None if someone else has it.

        The store's lock comes first (Redis: SET NX with a TTL kept alive while
        working; SQLite: flock). With Redis, whose daemons may sit on several
        machines, a claim file in the outbox (``O_EXCL`` on the file system they
        all share) is taken as well, always, so that while Redis is unreachable
        for some daemons and not for others no two can hold the same file.
        """
        name = f"claim:{pair.inbox.name}/{rel.as_posix()}"
        # a file name that is not valid UTF-8 (undecodable bytes) must still make a key
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        ttl = self.cfg.store.claim_ttl_s
        store_lease = None
        shared = self.cfg.store.backend == "redis"  # several machines may watch this inbox
        if self.store is not None:
            try:
                store_lease = try_lease(self.store, name, ttl)
            except Exception as exc:
                self.counters.add("claim_fallbacks")
                log.warning("claim_store_unavailable", error=f"{type(exc).__name__}: {exc}",
                            effect="claim files in the outbox keep each file to one daemon")
                shared = True
            else:
                if store_lease is None:
                    return None
        if not shared and store_lease is not None:
            return store_lease  # one machine: the flock is enough
        file_lease = None
        try:
            file_lease = try_lease(FileClaims(pair.outbox / CLAIMS_DIR), name, ttl)
        finally:
            if file_lease is None and store_lease is not None:
                store_lease.release()  # taken elsewhere, or the claim file failed
        return Leases(store_lease, file_lease) if file_lease is not None else None

    def _pair_index(self, pair: WatchPair) -> int:
        """Scheduler entries carry the pair's index (a reload may have replaced the pair)."""
        return self.cfg.watch.index(pair) if pair in self.cfg.watch else 0

    def _retry_or_fail(self, item: WorkItem, job: Job, result) -> None:
        if item.attempt < self.cfg.retry_attempts:
            delay = self.cfg.retry_backoff_s * (2 ** item.attempt)
            self.counters.add("retries")
            log.info("retry_scheduled", path=str(item.path), attempt=item.attempt + 1,
                     delay_s=delay, error=result.error)
            self.scheduler.retry(self._pair_index(item.pair), item.path, item.attempt + 1, delay)
            return
        self.counters.add("failed")
        log.error("giving_up", path=str(item.path), attempts=item.attempt + 1, error=result.error)
        try:
            write_failure(item.path, job.rel, item.pair.failed_dir, reason=result.reason or "retry",
                          exc=result.exc or RuntimeError(result.error),
                          detail=f"gave up after {item.attempt + 1} attempts: {result.error}")
        except OSError as exc:
            log.error("failed_dir_unwritable", path=str(item.path), error=str(exc))

    # ----------------------------------------------------------- control

    def request_stop(self, *_args) -> None:
        self.stop_event.set()

    def request_reload(self, *_args) -> None:
        self.reload_requested.set()

    def reload(self) -> None:
        self.reload_requested.clear()
        systemd.notify("RELOADING=1")
        try:
            new = configmod.load(self.cfg.source)
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc), effect="keeping the running config")
            systemd.notify("READY=1")
            return
        old = self.cfg
        self.cfg = new
        self.pipeline.cfg = new
        self.scheduler.settle_s = new.settle_s
        os.umask(new.umask)
        set_max_pixels(new.max_image_pixels)
        if (new.store, new.cache.dir) != (old.store, old.cache.dir):
            if self.store is not None:
                self.store.close()
            self.store = None
            self.pipeline.store = None
            self._open_store()
        elif self.store is not None:
            self.pruner = self._make_pruner()
        self._stop_watching()
        self._start_watching()
        self.rescan()
        log.info("config_reloaded", source=str(new.source), pairs=len(new.watch))
        systemd.notify("READY=1")

    def status(self) -> dict:
        c = self.counters.snapshot()
        queued = self.queue.qsize() + len(self.scheduler)
        state = self.state
        if state == "running":
            state = "busy" if queued or self.in_progress else "idle"
        store = self.store
        return {
            "pid": os.getpid(),
            "state": state,
            "started": self.started,
            "updated": time.time(),
            "config": str(self.cfg.source),
            "observer": self.observer_kind,
            "queued": queued,
            "in_progress": self.in_progress,
            "counters": c,
            "events_seen": sum(h.events for h in self.handlers),
            "cache": {
                "backend": self.cfg.store.backend if self.cfg.cache.enabled else "disabled",
                "available": (store is not None and getattr(store, "available", True)
                              and not self.pipeline.store_down),
                "error": self.store_error,
                "store_errors": self.pipeline.store_errors,
                "outages": getattr(store, "outages", 0),
            },
            "line": status_line(state, c, queued),
        }

    def _publish(self) -> None:
        st = self.status()
        try:
            write_status(configmod.state_path(self.cfg), st)
        except OSError:
            pass
        systemd.notify(f"STATUS={st['line']}")

    def _maybe_prune(self) -> None:
        if self.pruner is None or (self._prune_thread and self._prune_thread.is_alive()):
            return
        try:
            due = self.pruner.due(time.time())
        except Exception as exc:
            log.warning("prune_check_failed", error=str(exc))
            return
        if due:
            self._prune_thread = threading.Thread(target=self._prune, name="prune", daemon=True)
            self._prune_thread.start()

    def _prune(self) -> None:
        try:
            self.pruner.run(dry_run=False)
        except Exception as exc:
            log.warning("prune_failed", error=f"{type(exc).__name__}: {exc}")

    # --------------------------------------------------------------- run

    def run(self, *, once: bool = False) -> int:
        os.umask(self.cfg.umask)
        set_max_pixels(self.cfg.max_image_pixels)
        # load every configured model now: a missing model stops the start, with the fix
        for pair in self.cfg.watch:
            self.pipeline.key_for(pair.options)
        self.engines.embedder()
        self._open_store()
        for n in range(self.cfg.workers):
            t = threading.Thread(target=self._worker, name=f"worker-{n}", daemon=True)
            t.start()
            self.workers.append(t)
        self.state = "running"
        if once:
            return self._run_once()
        self.scheduler.start()
        self._start_watching()
        found = self.rescan()
        log.info("started", pid=os.getpid(), catch_up=found, workers=self.cfg.workers,
                 cache=self.cfg.store.backend if self.store else "unavailable")
        systemd.notify("READY=1")
        self._main_loop()
        return self._shutdown()

    def _run_once(self) -> int:
        """Process what is pending now (retries included), then exit."""
        self.scheduler.start()
        self.rescan(immediate=True)
        while not self.stop_event.is_set():
            self.queue.join()
            if not len(self.scheduler) and self.queue.empty():
                break
            self.stop_event.wait(0.2)
        return self._shutdown()

    def _main_loop(self) -> None:
        heartbeat = systemd.watchdog_interval()
        tick = min(heartbeat or 1.0, 1.0)
        last_rescan = last_progress = time.monotonic()
        last_store_try = 0.0
        last_published: str | None = None
        last_counts: dict = {}
        while not self.stop_event.wait(tick):
            now = time.monotonic()
            if heartbeat:
                systemd.notify("WATCHDOG=1")
            if self.reload_requested.is_set():
                self.reload()
            if (self.cfg.cache.enabled and self.store is None
                    and now - last_store_try > self.cfg.store.retry_s):
                last_store_try = now
                self._open_store()
            if self.cfg.rescan_interval_s and now - last_rescan >= self.cfg.rescan_interval_s:
                last_rescan = now
                self.rescan()
            self._maybe_prune()
            st = self.status()
            key = f"{st['line']}|{st['in_progress']}|{st['cache']}"
            if key != last_published:
                last_published = key
                self._publish()
            counts = st["counters"]
            if counts != last_counts and now - last_progress >= self.cfg.progress_interval_s:
                last_progress, last_counts = now, counts
                hits = sum(counts.get(t, 0) for t in ("exact", "pixel", "near"))
                log.info("progress", queued=st["queued"], in_progress=st["in_progress"],
                         done=hits + counts.get("miss", 0), hits=hits, misses=counts.get("miss", 0),
                         failed=counts.get("failed", 0))

    def _shutdown(self) -> int:
        self.state = "stopping"
        systemd.notify("STOPPING=1")
        self.stop_event.set()
        if self.pruner is not None and hasattr(self.pruner, "cancel"):
            self.pruner.cancel()  # stops after the current small batch
        self._stop_watching()
        self.scheduler.stop()
        for t in self.workers:
            t.join(timeout=600)  # the current file finishes; nothing new starts
        if self._prune_thread is not None:
            self._prune_thread.join(timeout=30)
        if self.store is not None:
            try:
                self.store.close()
            except Exception as exc:
                log.warning("cache_close_failed", error=str(exc))
        self.state = "stopped"
        self._publish()
        log.info("stopped", **self.counters.snapshot())
        return 0


def run_service(cfg: Config, *, once: bool = False) -> int:
    service = Service(cfg)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    signal.signal(signal.SIGHUP, service.request_reload)
    return service.run(once=once)
