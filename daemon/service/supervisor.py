"""The supervisor: lifecycle, reload, the tick loop and shutdown of `rembgd run`.

start: build the App (every model verified) -> workers -> settle queue ->
watchers -> catch-up scan -> READY=1. The tick loop sends WATCHDOG=1, runs
rescans and pruning, and publishes the status. SIGHUP builds a new App from the
re-read config and swaps it in, or refuses (naming the cause) and keeps the
old one. SIGTERM finishes or abandons the current file, never half-writes.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import structlog

from daemon import config as configmod
from daemon import logs, review, runtime
from daemon.cache.pruner import Pruner
from daemon.config import Config, ConfigError
from daemon.inference.models import ModelError
from daemon.config import WatchPair
from daemon.coord.claims import claims_dir
from daemon.coord.presence import Presence
from daemon.fsutil import ERROR_SUFFIX
from daemon.nofollow import remove_stale_temps
from daemon.job import Job
from daemon.scan import walk
from daemon.service import systemd
from daemon.service.app import App
from daemon.service.console import Web
from daemon.service.metrics import Metrics
from daemon.service.intake import Intake, WorkItem
from daemon.service.standby import Standby
from daemon.service.status import Counters, build_status, progress_fields, write_status
from daemon.service.settle import SettleQueue
from daemon.service.watcher import InboxHandler, choose_observer, make_observer
from daemon.service.watches import Watches
from daemon.service.workers import RetryPolicy, Workers

log = structlog.get_logger("rembgd.service")

EXIT_MODEL = 3
FULL_SCAN_S = 60.0  # the polling observer's full stat walk (in-place rewrites)
RESTART_ONLY = ("workers", "queue_size")  # settings a reload cannot change in place


class Supervisor:
    def __init__(self, cfg: Config, *, engines=None):
        """``engines``: already loaded inference engines to use (tests share one set)."""
        self.cfg = cfg
        self._engines = engines
        self.app: App | None = None
        self.counters = Counters()
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.exit_code = 0
        self.scheduler = SettleQueue(cfg.settle_s, self._submit_from_scheduler,
                                   incomplete_timeout_s=cfg.incomplete_timeout_s)
        self.retry_policy = RetryPolicy(self._schedule_retry, self.counters,
                                        lambda: self.cfg.retry_attempts,
                                        lambda: self.cfg.retry_backoff_s)
        self.standby = Standby()
        self.metrics = Metrics(queue_depth=self._queue_depth, standby=self._standby_pairs,
                               cache=self._cache_metrics,
                               incomplete=lambda: len(self.scheduler.waiting()),
                               review_pending=self._review_pending,
                               failed_files=self._failed_files)
        self.intake = Intake(lambda: self.app, self.counters, self.retry_policy.retry,
                             self.retry_policy.later, self.scheduler, self.standby, self.metrics)
        self.workers = Workers(cfg.workers, cfg.queue_size, self.intake.process, self.counters,
                               self.stop_event, self._model_error)
        self.watches: Watches | None = None
        self.handlers: list[InboxHandler] = []
        self.observer_kind = "none"
        self.pruner: Pruner | None = None
        self._prune_thread: threading.Thread | None = None
        self.started = time.time()
        self.state = "starting"
        self.ticks = self.idle_ticks = 0  # ticks of the main loop; the idle ones in a row
        self.presences: list[Presence] = []  # one per pair: other daemons on its inbox
        self.web = Web(self)  # the status page, when the config has `web:`
        self.intake.listeners.append(self.web.record)

    # ------------------------------------------------------------ set-up

    def _schedule_retry(self, item: WorkItem, delay: float) -> None:
        self.scheduler.retry(item.pair, item.path, item.attempt, delay, item.model)

    def _submit_from_scheduler(self, pair: int, path: Path, attempt: int,
                               model: str | None) -> None:
        self.workers.submit(WorkItem(pair, path, attempt, model))

    def _model_error(self, exc: ModelError) -> None:
        """A model vanished or broke while running: stop with the fix, files stay queued."""
        log.error("model_error", error=str(exc), effect="stopping; the inbox keeps its files")
        self.exit_code = EXIT_MODEL
        self.stop_event.set()

    def _start_watching(self) -> None:
        pairs = self.cfg.watch
        kind = choose_observer(self.cfg.observer, [p.inbox for p in pairs])
        watches = Watches(make_observer(kind, self.cfg.poll_interval_s,
                                        full_scan_s=FULL_SCAN_S, ignore=self.cfg.ignore), kind)
        for i, pair in enumerate(pairs):
            handler = InboxHandler(i, pair.inbox, pair.recursive, self.cfg.ignore, self.scheduler,
                                   self._scan_dir)
            if not watches.add(handler, pair.recursive):
                self.standby.check(i, pair)  # a missing inbox: standby, watched once it is back
        watches.start()
        self.watches, self.handlers, self.observer_kind = watches, watches.handlers, kind
        log.info("watching", observer=kind, inboxes=[str(p.inbox) for p in pairs])

    def stop_watching(self) -> None:
        if self.watches is not None:
            self.watches.stop()
            self.watches = None

    def _follow_inboxes(self) -> None:
        """An inbox gone puts its pair on standby; one back (or replaced by another folder,
        or remounted) is watched again, resumes at once and gets a catch-up scan."""
        for index, change in self.watches.refresh() if self.watches is not None else ():
            pair = self.cfg.watch[index]
            if change == "lost":
                self.standby.check(index, pair)  # logs pair_standby (once)
                continue
            log.warning("inbox_watched_again", inbox=str(pair.inbox), change=change,
                        effect="catch-up scan of the inbox")
            self.standby.wake(index)
            self.standby.check(index, pair)  # logs pair_resumed when it was on standby
            self.scheduler.wake(index)  # its files waiting on the standby backoff: now
            self.rescan(only=index)

    def _scan_dir(self, pair_index: int, folder: Path) -> None:
        pair = self.cfg.watch[pair_index]
        for path, _ in walk(folder, pair.recursive, self.cfg.ignore):
            self.scheduler.settle(pair_index, path)

    def rescan(self, *, immediate: bool = False, only: int | None = None) -> int:
        """Queue every inbox file (of pair ``only``, or all) the ledger does not know as
        processed (catch-up and safety net); also clears stale temp files from the outputs."""
        n = 0
        for i, pair in enumerate(self.cfg.watch):
            if only is not None and i != only:
                continue
            self._clean_temps(pair)
            for path, rel in walk(pair.inbox, pair.recursive, self.cfg.ignore):
                # with move/delete, a file still in the inbox is not finished even when
                # it was processed (killed before the move): the intake disposes of it
                if pair.after_success == "keep" and self._done(i, path, rel):
                    continue
                if immediate:
                    self.workers.submit(WorkItem(i, path))
                else:
                    self.scheduler.settle(i, path)
                n += 1
            if pair.inbox.is_dir():  # a full scan of it was made
                self._close_adoption(i)
        return n

    def _close_adoption(self, index: int) -> None:
        """After this version's first full scan of a pair, legacy (unstamped) outputs
        never vouch for a source again (``daemon.ledger``)."""
        try:
            self.app.ledgers[index].close_adoption()
        except OSError as exc:  # an outage: the next scan closes it
            log.debug("ledger_adoption_open", outbox=str(self.cfg.watch[index].outbox),
                      error=str(exc))

    def _done(self, index: int, path: Path, rel: Path) -> bool:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return True
        job = Job.for_pair(self.cfg.watch[index], rel, self.app.plan(index),
                           ledger=self.app.ledgers[index])
        try:
            return self.intake.is_done(job, st, hash_source=False)  # the workers hash
        except OSError:
            return False  # the intake looks again, and says why

    @staticmethod
    def _clean_temps(pair: WatchPair) -> None:
        for folder in pair.written_folders().values():
            try:
                removed = remove_stale_temps(folder)
            except OSError as exc:
                log.warning("temp_cleanup_failed", folder=str(folder), error=str(exc))
                continue
            if removed:
                log.info("stale_temps_removed", folder=str(folder), count=len(removed))

    def _announce(self) -> None:
        """A presence file per pair beside its claim files (``daemon.coord.presence``):
        another daemon on the same inbox is logged (``inbox_shared``), and the claim files
        keep each source to one of them."""
        for presence in self.presences:
            presence.withdraw()
        backend = self.cfg.store.backend if self.app is not None and self.app.cache else "none"
        self.presences = [Presence(claims_dir(p.outbox), p.inbox, backend)
                          for p in self.cfg.watch]
        for presence in self.presences:
            presence.tick()

    @staticmethod
    def _make_roots(pair: WatchPair) -> None:
        """The outbox exists from the start; if it vanishes later that is a share outage
        (standby), never silently re-created on the local disk under a lost mount."""
        try:
            pair.outbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("folder_unavailable", folder=str(pair.outbox), error=str(exc),
                        effect="the pair waits on standby until it works")

    # ----------------------------------------------------------- control

    def request_stop(self, *_args) -> None:
        self.stop_event.set()

    def request_reload(self, *_args) -> None:
        self.reload_requested.set()

    def reload(self) -> bool:
        """Re-read the config and swap in a complete new App; refuse on any failure."""
        self.reload_requested.clear()
        systemd.notify("RELOADING=1")
        try:
            new = configmod.load(self.cfg.source)
            fixed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.cfg, k)]
            if fixed:
                raise ConfigError(f"{new.source}: {', '.join(fixed)}: changing "
                                  f"{' and '.join(fixed)} needs a restart (systemctl restart)")
            app = App.build(new, previous=self.app)
        except (ConfigError, ModelError) as exc:
            log.error("config_reload_refused", error=str(exc),
                      effect="keeping the running config")
            systemd.notify("READY=1")
            return False
        old = self.app
        self.cfg, self.app = new, app
        runtime.configure(new)
        logs.setup(new.log_level, new.log_format)
        self.scheduler.settle_s = new.settle_s
        self.scheduler.incomplete_timeout_s = new.incomplete_timeout_s
        for pair in new.watch:
            self._make_roots(pair)
        if old is not None and not app.shares_cache_with(old):
            old.close()
        self._announce()
        self.stop_watching()
        self._start_watching()
        self.rescan()
        self.web.apply(new)
        log.info("config_reloaded", source=str(new.source), pairs=len(new.watch),
                 threads=new.threads, log_level=new.log_level)
        systemd.notify("READY=1")
        return True

    def status(self) -> dict:
        return build_status(self)

    # ------------------------------------------------------------ metrics (read at scrape)

    def _queue_depth(self) -> int:
        """Files queued or settling; not those waiting to become complete."""
        return self.workers.queue.qsize() + max(
            0, len(self.scheduler) - len(self.scheduler.waiting()))

    def _review_pending(self) -> int:
        return sum(len(review.list_items(review.review_dir(p))) for p in self.cfg.watch)

    def _failed_files(self) -> int:
        count = 0
        for p in self.cfg.watch:
            for _folder, dirs, files in os.walk(p.failed_dir, followlinks=False):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .dismissed/
                count += sum(1 for n in files if n.endswith(ERROR_SUFFIX)
                             and not n.startswith("."))
        return count

    def _standby_pairs(self) -> dict[str, bool]:
        return {str(p.inbox): self.standby.active(i) for i, p in enumerate(self.cfg.watch)}

    def _cache_metrics(self) -> dict:
        cache = self.app.cache if self.app is not None else None
        if cache is None:
            return {}
        state = cache.guard.status()
        return {"entries": cache.guard.call(lambda store: store.count(), default=None)
                if state["available"] else None,
                "available": state["available"], "outages": state["outages"]}

    def _publish(self, *, changed: bool = True) -> None:
        """Write the status file; ``changed`` False: only the tick counters moved (not
        fsynced, no STATUS= line)."""
        st = self.status()
        try:
            write_status(configmod.state_path(self.cfg), st, durable=changed)
        except OSError:
            pass
        if changed:
            systemd.notify(f"STATUS={st['line']}")

    def _maybe_prune(self) -> None:
        """Start a prune run when one is due; a failing store is reported by the cache
        guard (and the run retried on the next schedule)."""
        self.pruner = self.app.pruner_for(self.pruner) if self.app else None
        if self.pruner is None or (self._prune_thread and self._prune_thread.is_alive()):
            return
        pruner, guard = self.pruner, self.app.cache.guard
        if guard.call(lambda _store: pruner.due(time.time()), default=False):
            self._prune_thread = threading.Thread(
                target=guard.call, args=(lambda _store: pruner.run(dry_run=False),),
                name="prune", daemon=True)
            self._prune_thread.start()

    # --------------------------------------------------------------- run

    def run(self, *, once: bool = False) -> int:
        runtime.configure(self.cfg)
        self.app = App.build(self.cfg, engines=self._engines)  # a missing model: no start
        for pair in self.cfg.watch:
            self._make_roots(pair)
        self.workers.start()
        self.state = "running"
        self.scheduler.start()
        if once:
            return self._run_once()
        self._announce()
        self._start_watching()
        found = self.rescan()
        log.info("started", pid=os.getpid(), catch_up=found, workers=self.cfg.workers,
                 cache=self.cfg.store.backend if self.app.cache else "disabled")
        systemd.notify("READY=1")
        self.web.apply(self.cfg)
        self._main_loop()
        return self._shutdown()

    def _run_once(self) -> int:
        """Process what is pending now (retries included), then exit."""
        self.rescan(immediate=True)
        while not self.stop_event.is_set():
            self.workers.queue.join()
            if not len(self.scheduler) and self.workers.queue.empty():
                break
            self.stop_event.wait(0.2)
        return self._shutdown()

    def _main_loop(self) -> None:
        heartbeat = systemd.watchdog_interval()
        tick = min(heartbeat or 1.0, 1.0)
        last_rescan = last_progress = time.monotonic()
        last_published: str | None = None
        last_counts: dict = {}
        while not self.stop_event.wait(tick):
            now = time.monotonic()
            if heartbeat:
                systemd.notify("WATCHDOG=1")
            self._follow_inboxes()
            if self.reload_requested.is_set():
                self.reload()
            if self.cfg.rescan_interval_s and now - last_rescan >= self.cfg.rescan_interval_s:
                last_rescan = now
                self.rescan()
            self._maybe_prune()
            for presence in self.presences:
                presence.tick(now)
            st = self.status()
            self.ticks += 1  # what tests wait on instead of sleeping: idle for n ticks
            self.idle_ticks = self.idle_ticks + 1 if st["state"] == "idle" else 0
            key = f"{st['line']}|{st['in_progress']}|{st['cache']}"
            self._publish(changed=key != last_published)
            last_published = key
            counts = st["counters"]
            if counts != last_counts and now - last_progress >= self.cfg.progress_interval_s:
                last_progress, last_counts = now, counts
                log.info("progress", **progress_fields(st))

    def _shutdown(self) -> int:
        self.state = "stopping"
        systemd.notify("STOPPING=1")
        self.stop_event.set()
        self.web.close()
        if self.pruner is not None:
            self.pruner.cancel()  # stops after the current small batch
        self.stop_watching()
        self.scheduler.stop()
        self.workers.join()
        for presence in self.presences:
            presence.withdraw()
        if self._prune_thread is not None:
            self._prune_thread.join(timeout=30)
        if self.app is not None:
            self.app.close()
        self.state = "stopped"
        self._publish()
        log.info("stopped", exit_code=self.exit_code, **self.counters.snapshot())
        return self.exit_code


def run_service(cfg: Config, *, once: bool = False) -> int:
    supervisor = Supervisor(cfg)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGHUP, supervisor.request_reload)
    return supervisor.run(once=once)
