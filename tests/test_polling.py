"""The folder poller: new files, new folders and rewrites are seen; idle polls list nothing."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from daemon.config import DEFAULT_IGNORE
from daemon.service import polling
from daemon.service.polling import HOT_POLLS, FolderPoller
from daemon.service.settle import SettleQueue
from daemon.service.watcher import InboxHandler, make_observer


@pytest.fixture
def inbox(tmp_path):
    root = tmp_path / "inbox"
    for d in ("a", "b", "b/c"):
        (root / d).mkdir(parents=True)
        for i in range(3):
            (root / d / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    return root


@pytest.fixture
def listed(monkeypatch):
    """The folders os.scandir was called on (the real scandir still runs)."""
    calls: list[str] = []
    real = os.scandir

    def spy(path="."):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(polling.os, "scandir", spy)
    return calls


def _kinds(events) -> list[tuple[str, str]]:
    return sorted((type(e).__name__, e.src_path) for e in events)


def _settle_hot(poller: FolderPoller) -> None:
    for _ in range(HOT_POLLS + 1):
        poller.poll()


def test_an_idle_poll_lists_no_folder_and_stats_no_file(inbox, listed):
    poller = FolderPoller(inbox)
    poller.prime()
    assert sorted(listed) == sorted(str(p) for p in (inbox, inbox / "a", inbox / "b", inbox / "b/c"))
    listed.clear()
    stats = poller.stats
    for _ in range(5):
        assert poller.poll() == []
    assert listed == [] and poller.stats == stats


def test_a_new_file_is_seen_and_only_its_folder_is_listed(inbox, listed):
    poller = FolderPoller(inbox)
    poller.prime()
    listed.clear()
    (inbox / "b" / "c" / "new.jpg").write_bytes(b"new")
    assert _kinds(poller.poll()) == [("FileCreatedEvent", str(inbox / "b/c/new.jpg"))]
    assert listed == [str(inbox / "b" / "c")]
    _settle_hot(poller)
    listed.clear()
    assert poller.poll() == [] and listed == []


def test_a_new_folder_raises_one_event_and_is_watched_from_then_on(inbox):
    poller = FolderPoller(inbox)
    poller.prime()
    (inbox / "a" / "shoot").mkdir()
    (inbox / "a" / "shoot" / "1.jpg").write_bytes(b"1")
    events = poller.poll()
    assert _kinds(events) == [("DirCreatedEvent", str(inbox / "a/shoot"))]  # the handler scans it
    _settle_hot(poller)
    (inbox / "a" / "shoot" / "2.jpg").write_bytes(b"2")
    assert _kinds(poller.poll()) == [("FileCreatedEvent", str(inbox / "a/shoot/2.jpg"))]


def test_an_in_place_rewrite_is_seen_on_the_full_pass(inbox, listed):
    poller = FolderPoller(inbox)
    poller.prime()
    target = inbox / "b" / "1.jpg"
    with open(target, "r+b") as fh:  # same name, same folder mtime
        fh.write(b"zz")
    os.utime(target, ns=(1, 1))
    assert poller.poll() == []  # folders only: not seen yet
    assert _kinds(poller.poll(full=True)) == [("FileModifiedEvent", str(target))]
    assert len(listed) == 4 + 4  # prime + the full pass
    _settle_hot(poller)
    assert poller.poll(full=True) == []


def test_deletions(inbox):
    poller = FolderPoller(inbox)
    poller.prime()
    (inbox / "a" / "0.jpg").unlink()
    for f in (inbox / "b" / "c").iterdir():
        f.unlink()
    (inbox / "b" / "c").rmdir()
    kinds = _kinds(poller.poll())
    assert ("FileDeletedEvent", str(inbox / "a/0.jpg")) in kinds
    assert ("DirDeletedEvent", str(inbox / "b/c")) in kinds
    assert str(inbox / "b/c") not in poller.folders


def test_links_are_not_followed_and_ignored_folders_not_entered(inbox, tmp_path, listed):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"s")
    (inbox / ".git").mkdir()
    (inbox / ".git" / "objects.jpg").write_bytes(b"o")
    poller = FolderPoller(inbox, ignore=DEFAULT_IGNORE)
    poller.prime()
    (inbox / "a" / "linked").symlink_to(outside)
    events = poller.poll()
    assert _kinds(events) == [("FileCreatedEvent", str(inbox / "a/linked"))]  # the worker skips links
    assert not any(p.startswith(str(outside)) or ".git" in p for p in listed)


def test_a_non_recursive_watch_tracks_only_the_top(inbox):
    poller = FolderPoller(inbox, recursive=False)
    poller.prime()
    assert list(poller.folders) == [str(inbox)]
    (inbox / "a" / "x.jpg").write_bytes(b"x")
    (inbox / "top.jpg").write_bytes(b"x")
    assert _kinds(poller.poll()) == [("FileCreatedEvent", str(inbox / "top.jpg"))]


def test_the_observer_feeds_the_inbox_handler(inbox):
    """make_observer('polling') end to end: a new file reaches the workers, a new folder is scanned."""
    submitted = threading.Event()
    scanned = threading.Event()
    got: list[Path] = []
    scheduler = SettleQueue(0.05, lambda pair, path, attempt, model: (got.append(path), submitted.set()))
    handler = InboxHandler(0, inbox, True, DEFAULT_IGNORE, scheduler,
                           lambda pair, folder: scanned.set() if folder == inbox / "new" else None)
    observer = make_observer("polling", 0.05, full_scan_s=0.5, ignore=DEFAULT_IGNORE)
    observer.schedule(handler, str(inbox), recursive=True)
    scheduler.start()
    observer.start()
    try:
        (inbox / "a" / "fresh.jpg").write_bytes(b"fresh")
        (inbox / "a" / ".fresh.jpg.part").write_bytes(b"ignored")
        assert submitted.wait(5.0)
        assert got == [inbox / "a" / "fresh.jpg"]
        (inbox / "new").mkdir()
        assert scanned.wait(5.0)
    finally:
        observer.stop()
        observer.join(5)
        scheduler.stop()
