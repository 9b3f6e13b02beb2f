"""Cheap polling of inbox folders on network shares (NFS, SMB), where inotify is blind.

watchdog's ``PollingObserver`` lists every folder and stats every file on each
poll: with 10,000 processed files that is a steady few percent of a core for
nothing. Here each poll stats only the folders, and re-lists a folder only when
its mtime, ctime or inode changed (creating, renaming or deleting a file changes
its folder's mtime on local file systems, NFS and SMB); a folder that just
changed is re-listed on the next polls too (coarse mtime granularity on some
servers). Every ``full_scan_s`` a full pass re-lists every folder and stats every
file, to catch in-place rewrites, which leave the folder's mtime alone.

The same watchdog events as its own observers are emitted (``FileCreatedEvent``,
``FileModifiedEvent``, ``DirCreatedEvent``, deletions), so ``InboxHandler`` works
unchanged. Files present at start raise no events: the catch-up scan owns them.
A new folder raises one ``DirCreatedEvent``; the handler scans it.

Limits: on NFS the client caches folder attributes (``acdirmin``/``acdirmax``,
30-60 s by default), which delays what any stat-based poller sees; the periodic
full pass and the service's rescan are the safety net. Links are never followed.
"""
from __future__ import annotations

import errno
import functools
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileModifiedEvent, FileSystemEvent)
from watchdog.observers.api import BaseObserver, EventEmitter

from daemon.scan import is_ignored

HOT_POLLS = 2  # re-list a folder that changed on this many more polls


@dataclass
class _Folder:
    sig: tuple[int, int, int] | None = None  # (mtime_ns, ctime_ns, ino) when last listed
    files: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> size, mtime, ino
    dirs: set[str] = field(default_factory=set)
    hot: int = 0


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class FolderPoller:
    """The polling state of one watched tree; ``poll()`` returns what changed since.

    Synchronous and thread-free (the emitter calls it on its interval); ``listings``
    and ``stats`` count folder listings and file stats, for tests and benchmarks.
    """

    def __init__(self, root: Path, *, recursive: bool = True, ignore: tuple[str, ...] = ()):
        self.root = str(root)
        self.recursive = recursive
        self.ignore = ignore
        self.folders: dict[str, _Folder] = {}
        self.listings = 0
        self.stats = 0

    def prime(self) -> None:
        """Learn the tree as it is now, raising no events."""
        self.folders.clear()
        self._learn(self.root)

    def poll(self, *, full: bool = False) -> list[FileSystemEvent]:
        """Events for what changed since the last poll; ``full`` also finds in-place rewrites."""
        events: list[FileSystemEvent] = []
        for path in sorted(self.folders):  # parents before children
            folder = self.folders.get(path)
            if folder is None:
                continue  # dropped with its parent during this poll
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) and path != self.root:
                    self._drop(path, events)  # gone (its parent's listing reports it too)
                continue  # the root missing or a share hiccup: keep what we knew, try again
            if not stat.S_ISDIR(st.st_mode):
                if path != self.root:
                    self._drop(path, events)
                continue
            if full or folder.hot or _sig(st) != folder.sig:
                self._relist(path, folder, _sig(st), events)
        return events

    # ------------------------------------------------------------ internals

    def _scan(self, path: str) -> tuple[dict[str, tuple[int, int, int]], set[str]]:
        files: dict[str, tuple[int, int, int]] = {}
        dirs: set[str] = set()
        self.listings += 1
        with os.scandir(path) as it:
            for entry in it:
                if self.ignore and is_ignored(entry.name, self.ignore):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self.recursive:
                            dirs.add(entry.name)
                        continue
                    self.stats += 1
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while listing
                files[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return files, dirs

    def _learn(self, path: str) -> None:
        """Add folder ``path`` and everything below it without file events."""
        try:
            sig = _sig(os.stat(path, follow_symlinks=False))
            files, dirs = self._scan(path)
        except OSError:
            self.folders[path] = _Folder(hot=HOT_POLLS)  # unreadable now: retried next poll
            return
        self.folders[path] = _Folder(sig, files, dirs)
        for d in dirs:
            self._learn(os.path.join(path, d))

    def _relist(self, path: str, folder: _Folder, sig: tuple[int, int, int],
                events: list[FileSystemEvent]) -> None:
        try:
            files, dirs = self._scan(path)
        except OSError:
            return  # EIO, ESTALE, EACCES...: keep the old listing, try again next poll
        changed = False
        for name, info in files.items():
            old = folder.files.get(name)
            if old is None:
                events.append(FileCreatedEvent(os.path.join(path, name)))
                changed = True
            elif old != info:
                events.append(FileModifiedEvent(os.path.join(path, name)))
                changed = True
        for name in folder.files.keys() - files.keys():
            events.append(FileDeletedEvent(os.path.join(path, name)))
            changed = True
        for name in dirs - folder.dirs:
            sub = os.path.join(path, name)
            events.append(DirCreatedEvent(sub))
            self._learn(sub)
            changed = True
        for name in folder.dirs - dirs:
            self._drop(os.path.join(path, name), events)
            changed = True
        folder.sig, folder.files, folder.dirs = sig, files, dirs
        folder.hot = HOT_POLLS if changed else max(folder.hot - 1, 0)

    def _drop(self, path: str, events: list[FileSystemEvent]) -> None:
        prefix = path + os.sep
        for p in [p for p in self.folders if p == path or p.startswith(prefix)]:
            del self.folders[p]
        events.append(DirDeletedEvent(path))


class FolderPollingEmitter(EventEmitter):
    """A watchdog emitter around ``FolderPoller``: a quick poll every ``timeout`` seconds,
    a full pass every ``full_scan_s``."""

    def __init__(self, event_queue, watch, *, timeout: float = 2.0, event_filter=None,
                 full_scan_s: float = 60.0, ignore: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        self.poller = FolderPoller(Path(watch.path), recursive=watch.is_recursive, ignore=ignore)
        self.full_scan_s = full_scan_s
        self._clock = clock
        self._last_full = 0.0

    def on_thread_start(self) -> None:
        self.poller.prime()
        self._last_full = self._clock()

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(timeout):
            return
        now = self._clock()
        full = self.full_scan_s > 0 and now - self._last_full >= self.full_scan_s
        if full:
            self._last_full = now
        for event in self.poller.poll(full=full):
            self.queue_event(event)


class FolderPollingObserver(BaseObserver):
    """Drop-in for watchdog's ``PollingObserver``: ``schedule``, ``start``, ``stop``, ``join``."""

    def __init__(self, *, timeout: float = 2.0, full_scan_s: float = 60.0,
                 ignore: tuple[str, ...] = ()):
        emitter = functools.partial(FolderPollingEmitter, full_scan_s=full_scan_s, ignore=ignore)
        super().__init__(emitter, timeout=timeout)
