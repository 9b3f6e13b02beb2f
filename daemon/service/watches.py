"""One watch per inbox that follows its folder, not the inode it first found.

A watchdog watch holds on to a folder: an inbox deleted and re-created
(``rm -rf inbox; mkdir inbox``), replaced by another folder (a new inode) or
remounted (a new device) keeps a dead watch that sees nothing, and a missing
inbox cannot be watched at all. ``refresh()``, called on every tick, compares
each inbox's identity (device, inode) with the watched one: gone -> the watch is
dropped; back or replaced -> it is set up again. A folder deleted and re-created
at once can get the inode number just freed, so the same identity is no proof:
an event saying the watched folder itself went (``InboxHandler.root_gone``:
inotify's IN_DELETE_SELF, IN_MOVE_SELF) re-arms the watch too. It returns what changed; the
caller logs it, puts the pair on standby or resumes it, and scans the inbox.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from watchdog.observers.api import ObservedWatch

from daemon.service.watcher import InboxHandler

Identity = tuple[int, int]


def identity(folder: Path) -> Identity | None:
    """(device, inode) of the folder at ``folder`` now; None when there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class _Inbox:
    handler: InboxHandler
    recursive: bool
    ident: Identity | None = None
    watch: ObservedWatch | None = None


class Watches:
    """An observer and the watch of each inbox (by its handler's pair key)."""

    def __init__(self, observer, kind: str):
        self.observer, self.kind = observer, kind
        self._inboxes: list[_Inbox] = []

    @property
    def handlers(self) -> list[InboxHandler]:
        return [i.handler for i in self._inboxes]

    def add(self, handler: InboxHandler, recursive: bool) -> bool:
        """Watch ``handler.inbox``; False when it is missing (watched once it appears)."""
        inbox = _Inbox(handler, recursive)
        self._inboxes.append(inbox)
        return self._watch(inbox)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def refresh(self) -> list[tuple[str, str]]:
        """(pair key, "lost" | "returned" | "replaced") for each inbox whose folder
        changed since it was watched; each change is reported once."""
        changes = []
        for inbox in self._inboxes:
            gone, inbox.handler.root_gone = inbox.handler.root_gone, False
            now = identity(inbox.handler.inbox)
            if now == inbox.ident and not gone:
                continue
            before = inbox.ident
            self._unwatch(inbox)
            if now is not None and self._watch(inbox):
                changes.append((inbox.handler.pair, "returned" if before is None else "replaced"))
            elif before is not None:
                changes.append((inbox.handler.pair, "lost"))
        return changes

    def _watch(self, inbox: _Inbox) -> bool:
        ident = identity(inbox.handler.inbox)
        if ident is None:
            return False
        try:
            inbox.watch = self.observer.schedule(inbox.handler, str(inbox.handler.inbox),
                                                 recursive=inbox.recursive)
        except OSError:  # gone again in between: the next refresh sees it
            return False
        inbox.ident = ident
        return True

    def _unwatch(self, inbox: _Inbox) -> None:
        if inbox.watch is not None:
            try:
                self.observer.unschedule(inbox.watch)
            except (KeyError, OSError):
                pass  # its emitter already stopped on the folder's deletion
        inbox.watch, inbox.ident = None, None
