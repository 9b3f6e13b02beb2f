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

from daemon.config import Config
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

    def rescan(self, *, immediate: bool = False, only: int | None = None) -> int:
        """Queue every inbox file (of pair ``only``, or all) not known as processed;
        how many were queued."""
        cfg, n = self._config(), 0
        for i, pair in enumerate(cfg.watch):
            if only is not None and i != only:
                continue
            for path, rel in walk(pair.inbox, pair.recursive, cfg.ignore):
                # with move/delete, a file still in the inbox is not finished even when
                # it was processed (killed before the move): the intake disposes of it
                if pair.after_success == "keep" and self._done(i, path, rel):
                    continue
                if immediate:
                    self._submit(WorkItem(i, path))
                else:
                    self._settle(i, path)
                n += 1
            if pair.inbox.is_dir():  # a full scan of it was made
                self._close_adoption(i)
        return n

    def scan_dir(self, pair_index: int, folder: Path) -> None:
        """A folder that appeared in a watched inbox (moved in whole): settle its files."""
        cfg = self._config()
        pair = cfg.watch[pair_index]
        for path, _ in walk(folder, pair.recursive, cfg.ignore):
            self._settle(pair_index, path)

    def _close_adoption(self, index: int) -> None:
        """After this version's first full scan of a pair, legacy (unstamped) outputs
        never vouch for a source again (``daemon.ledger``)."""
        try:
            self._app().ledgers[index].close_adoption()
        except OSError as exc:  # an outage: the next scan closes it
            log.debug("ledger_adoption_open", outbox=str(self._config().watch[index].outbox),
                      error=str(exc))

    def _done(self, index: int, path: Path, rel: Path) -> bool:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return True
        app = self._app()
        job = Job.for_pair(self._config().watch[index], rel, app.plan(index),
                           ledger=app.ledgers[index])
        try:
            return self._intake.is_done(job, st, hash_source=False)  # the workers hash
        except OSError:
            return False  # the intake looks again, and says why
