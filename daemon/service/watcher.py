"""Watching inboxes: watchdog observers and the event filter that feeds the settle queue.

Only events that can mean "a file's content is (being) written" count:
created, modified, closed-after-write and moved-in. ``opened`` and
``closed_no_write`` (our own reads) are ignored, and so is anything under an
ignored name, a temp name, or outside the inbox. Each remaining event becomes
a settle request (``daemon.service.settle``); a closed-after-write or moved-in
event on inotify marks the file complete: the writer has said it is done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent,
                             FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from daemon.scan import ignored_path
from daemon.service.polling import FolderPollingObserver
from daemon.service.settle import SettleQueue

NETWORK_FS = {"cifs", "smb3", "smbfs", "nfs", "nfs4", "fuse.sshfs", "9p", "afs", "ceph",
              "glusterfs", "fuse.glusterfs", "davfs", "fuse.rclone", "lustre", "beegfs",
              "fuse.s3fs", "fuse.gcsfuse", "virtiofs"}


def fs_type(path: Path) -> str:
    """File system type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def choose_observer(mode: str, inboxes: list[Path]) -> str:
    """``auto``: polling if any inbox is on a network file system, else inotify."""
    if mode != "auto":
        return mode
    return "polling" if any(fs_type(p) in NETWORK_FS for p in inboxes) else "inotify"


class InboxHandler(FileSystemEventHandler):
    """Turns watchdog events for one inbox into settle requests."""

    def __init__(self, pair: str, inbox: Path, recursive: bool, ignore: tuple[str, ...],
                 scheduler: SettleQueue, on_dir: Callable[[str, Path], None]):
        """``pair``: the pair's key (``WatchPair.key``)."""
        self.pair, self.inbox, self.recursive, self.ignore = pair, inbox, recursive, ignore
        self.scheduler, self.on_dir = scheduler, on_dir
        self.events = 0  # every event watchdog delivered (for the event-storm bound)
        # the watched folder itself was deleted or moved away (inotify's IN_DELETE_SELF,
        # IN_MOVE_SELF): its watch is dead even if a new folder at the path has the same
        # (device, inode), as after ``rm -rf in && mkdir in``; ``Watches.refresh`` re-arms
        self.root_gone = False

    def _relevant(self, path: str) -> Path | None:
        p = Path(path)
        try:
            rel = p.relative_to(self.inbox)
        except ValueError:
            return None
        if not rel.parts or ignored_path(rel, self.ignore):
            return None
        if not self.recursive and len(rel.parts) > 1:
            return None
        return p

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events += 1
        if isinstance(event, (DirDeletedEvent, DirMovedEvent)) and \
                os.fsdecode(event.src_path) == str(self.inbox):
            self.root_gone = True
            return
        if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            target = self._relevant(getattr(event, "dest_path", "") or event.src_path)
            if target is not None and self.recursive:
                self.on_dir(self.pair, target)  # a folder moved or copied in: scan it
            return
        if isinstance(event, FileMovedEvent):
            self.scheduler.forget(Path(event.src_path))
            target = self._relevant(event.dest_path)
            if target is not None:
                self.scheduler.settle(self.pair, target, complete=True)
            return
        if isinstance(event, FileClosedEvent):
            target = self._relevant(event.src_path)
            if target is not None:
                self.scheduler.settle(self.pair, target, complete=True)
            return
        if isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            target = self._relevant(event.src_path)
            if target is not None:
                self.scheduler.settle(self.pair, target)
        # opened, closed_no_write, deleted: nothing to do


def make_observer(kind: str, poll_interval: float, *, full_scan_s: float = 60.0,
                  ignore: tuple[str, ...] = ()):
    """``polling``: rembgd's folder poller (``daemon.service.polling``): stats folders every
    ``poll_interval``, every file every ``full_scan_s``; ``watchdog-polling``: watchdog's own
    (lists and stats everything each poll); anything else: inotify."""
    if kind == "polling":
        return FolderPollingObserver(timeout=poll_interval, full_scan_s=full_scan_s, ignore=ignore)
    if kind == "watchdog-polling":
        return PollingObserver(timeout=poll_interval)
    return Observer()
