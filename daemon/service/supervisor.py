"""The supervisor: lifecycle, reload, the tick loop and shutdown of `rembgd run`.

start: build the App (every model verified) -> workers -> settle queue ->
watchers -> catch-up scan -> READY=1. The tick loop sends WATCHDOG=1, follows the
inboxes, runs rescans (``catchup``) and pruning (``housekeeping``), and publishes
the status (``publishing``). SIGHUP builds a new App from the re-read config and
swaps it in, or refuses (naming the cause) and keeps the old one. SIGTERM
finishes or abandons the current file, never half-writes.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import structlog

from daemon import config as configmod
from daemon import logs, runtime
from daemon.config import Config, ConfigError, WatchPair
from daemon.coord.claims import claims_dir
from daemon.coord.presence import Presence
from daemon.inference.models import ModelError
from daemon.service import systemd
from daemon.service.app import App
from daemon.service.catchup import CatchUp
from daemon.service.console import Web
from daemon.service.housekeeping import PruneSchedule, sweep_temps
from daemon.service.intake import Intake, WorkItem
from daemon.service.metrics import Metrics
from daemon.service.publishing import Publisher, Readings
from daemon.service.settle import SettleQueue
from daemon.service.standby import Standby
from daemon.service.status import Counters, build_status
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
        readings = Readings(self)
        self.metrics = Metrics(queue_depth=readings.queue_depth, standby=readings.standby_pairs,
                               cache=readings.cache,
                               incomplete=lambda: len(self.scheduler.waiting()),
                               review_pending=readings.review_pending,
                               failed_files=readings.failed_files)
        self.intake = Intake(lambda: self.app, self.counters, self.retry_policy.retry,
                             self.retry_policy.later, self.scheduler, self.standby, self.metrics)
        self.workers = Workers(cfg.workers, cfg.queue_size, self.intake.process, self.counters,
                               self.stop_event, self._model_error)
        self.watches: Watches | None = None
        self.handlers: list[InboxHandler] = []
        self.observer_kind = "none"
        self.catchup = CatchUp(lambda: self.cfg, lambda: self.app, self.intake,
                               self.workers.submit, self.scheduler.settle)
        self.prunes = PruneSchedule(lambda: self.app)
        self.publisher = Publisher(self)
        self.started = time.time()
        self.state = "starting"
        self.presences: list[Presence] = []  # one per pair: other daemons on its inbox
        self.web = Web(self)  # the status page, when the config has `web:`
        self.intake.listeners.append(self.web.record)

    # ------------------------------------------------------------ set-up

    def _schedule_retry(self, item: WorkItem, delay: float) -> None:
        self.scheduler.retry(item.pair, item.path, item.attempt, delay, item.model)

    def _submit_from_scheduler(self, pair: str, path: Path, attempt: int,
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
        for pair in pairs:
            handler = InboxHandler(pair.key, pair.inbox, pair.recursive, self.cfg.ignore,
                                   self.scheduler, self.catchup.scan_dir)
            if not watches.add(handler, pair.recursive):
                self.standby.check(pair)  # a missing inbox: standby, watched once it is back
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
        for key, change in self.watches.refresh() if self.watches is not None else ():
            pair = next(p for p in self.cfg.watch if p.key == key)
            if change == "lost":
                self.standby.check(pair)  # logs pair_standby (once)
                continue
            log.warning("inbox_watched_again", inbox=str(pair.inbox), change=change,
                        effect="catch-up scan of the inbox")
            self.standby.wake(key)
            self.standby.check(pair)  # logs pair_resumed when it was on standby
            self.scheduler.wake(key)  # its files waiting on the standby backoff: now
            self.rescan(only=key)

    def rescan(self, *, immediate: bool = False, only: str | None = None) -> int:
        """Sweep the stale temp files of every pair's outputs (of the pair whose key is
        ``only``, or all),
        then queue every inbox file not known as processed (``CatchUp.rescan``): the
        catch-up and the safety net. How many were queued."""
        for pair in self.cfg.watch:
            if only is None or pair.key == only:
                sweep_temps(pair)
        return self.catchup.rescan(immediate=immediate, only=only)

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
        last_rescan = time.monotonic()
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
            self.prunes.tick()
            for presence in self.presences:
                presence.tick(now)
            self.publisher.tick(now)

    def _shutdown(self) -> int:
        self.state = "stopping"
        systemd.notify("STOPPING=1")
        self.stop_event.set()
        self.web.close()
        self.prunes.cancel()
        self.stop_watching()
        self.scheduler.stop()
        self.workers.join()
        for presence in self.presences:
            presence.withdraw()
        self.prunes.join()
        if self.app is not None:
            self.app.close()
        self.state = "stopped"
        self.publisher.publish()
        log.info("stopped", exit_code=self.exit_code, **self.counters.snapshot())
        return self.exit_code


def run_service(cfg: Config, *, once: bool = False) -> int:
    supervisor = Supervisor(cfg)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGHUP, supervisor.request_reload)
    return supervisor.run(once=once)
