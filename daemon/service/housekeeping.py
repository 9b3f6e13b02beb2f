"""Housekeeping beside the work: stale temp files swept, the cache pruned on schedule."""
from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

from daemon.cache.pruner import Pruner
from daemon.config import WatchPair
from daemon.nofollow import remove_stale_temps
from daemon.service.app import App

log = structlog.get_logger("rembgd.service")


def sweep_temps(pair: WatchPair) -> None:
    """Remove the stale temp files (``nofollow.remove_stale_temps``) of every folder the
    pair writes to; a folder that cannot be read is logged and skipped."""
    for folder in pair.written_folders().values():
        try:
            removed = remove_stale_temps(folder)
        except OSError as exc:
            log.warning("temp_cleanup_failed", folder=str(folder), error=str(exc))
            continue
        if removed:
            log.info("stale_temps_removed", folder=str(folder), count=len(removed))


class PruneSchedule:
    """One prune run at a time, in its own thread, when the running App's pruner is due.
    A failing store is reported by the cache guard, and the run retried when due again."""

    def __init__(self, app: Callable[[], App | None]):
        self._app = app
        self.pruner: Pruner | None = None
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        app = self._app()
        self.pruner = app.pruner_for(self.pruner) if app else None
        if self.pruner is None or (self._thread and self._thread.is_alive()):
            return
        pruner, guard = self.pruner, app.cache.guard
        if guard.call(lambda _store: pruner.due(time.time()), default=False):
            self._thread = threading.Thread(
                target=guard.call, args=(lambda _store: pruner.run(dry_run=False),),
                name="prune", daemon=True)
            self._thread.start()

    def cancel(self) -> None:
        """A running prune stops after its current small batch."""
        if self.pruner is not None:
            self.pruner.cancel()

    def join(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)
