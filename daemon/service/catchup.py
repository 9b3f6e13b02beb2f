"""Catch-up: queue the inbox files the ledger does not know as processed.

At start, after a reload, when an inbox comes back and every
``rescan_interval_s`` (the safety net under the watchers), each pair's inbox is
walked; a file its ledger (or its outputs' stamps, without hashing here) vouches
for is skipped, every other one is queued. A full scan of a pair also ends the
upgrade's adoption of unstamped outputs (``daemon.ledger``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import structlog

from daemon.config import Config, WatchPair
from daemon.job import Job
from daemon.scan import walk
from daemon.service.app import App
from daemon.service.intake import Intake, WorkItem

log = structlog.get_logger("rembgd.service")


class CatchUp:
    def __init__(self, config: Callable[[], Config], app: Callable[[], App | None],
                 intake: Intake, submit: Callable[[WorkItem], None],
                 settle: Callable[[int, Path], None]):
        """``config``/``app``: the running ones (a reload swaps them); ``submit`` hands an
        item to the workers at once, ``settle`` to the settle queue."""
        self._config, self._app = config, app
        self._intake, self._submit, self._settle = intake, submit, settle

    def rescan(self, *, immediate: bool = False, only: str | None = None) -> int:
        """Queue every inbox file (of the pair whose key is ``only``, or all) not known
        as processed; how many were queued."""
        cfg, n = self._config(), 0
        for pair in cfg.watch:
            if only is not None and pair.key != only:
                continue
            for path, rel in walk(pair.inbox, pair.recursive, cfg.ignore):
                # with move/delete, a file still in the inbox is not finished even when
                # it was processed (killed before the move): the intake disposes of it
                if pair.after_success == "keep" and self._done(pair, path, rel):
                    continue
                if immediate:
                    self._submit(WorkItem(pair.key, path))
                else:
                    self._settle(pair.key, path)
                n += 1
            if pair.inbox.is_dir():  # a full scan of it was made
                self._close_adoption(pair)
        return n

    def scan_dir(self, key: str, folder: Path) -> None:
        """A folder that appeared in a watched inbox (moved in whole): settle its files."""
        cfg = self._config()
        pair = next((p for p in cfg.watch if p.key == key), None)
        if pair is None:  # a reload removed the pair
            return
        for path, _ in walk(folder, pair.recursive, cfg.ignore):
            self._settle(key, path)

    def _close_adoption(self, pair: WatchPair) -> None:
        """After this version's first full scan of a pair, legacy (unstamped) outputs
        never vouch for a source again (``daemon.ledger``)."""
        try:
            self._app().ledgers[pair.key].close_adoption()
        except OSError as exc:  # an outage: the next scan closes it
            log.debug("ledger_adoption_open", outbox=str(pair.outbox), error=str(exc))

    def _done(self, pair: WatchPair, path: Path, rel: Path) -> bool:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return True
        app = self._app()
        job = Job.for_pair(pair, rel, app.plan(pair.key), ledger=app.ledgers[pair.key])
        try:
            return self._intake.is_done(job, st, hash_source=False)  # the workers hash
        except OSError:
            return False  # the intake looks again, and says why
