"""The folder rules of the watch pairs, checked when the service starts or reloads.

Each inbox exists; no outbox, failed_dir, done_dir, review.dir or cache.dir lies inside an
inbox or around it, a pair's own folders do not overlap, and nothing a pair writes lands in
another pair's inbox (it would feed its own outputs back).
"""
from __future__ import annotations

from pathlib import Path

from daemon.config.schema import ConfigError, WatchPair


def is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_folders(source: Path, pairs: tuple[WatchPair, ...], cache_dir: Path) -> None:
    def fail(i: int, key: str, msg: str) -> None:
        raise ConfigError(f"{source}: watch[{i}].{key}: {msg}")

    if not pairs:
        raise ConfigError(f"{source}: watch: at least one {{inbox, outbox}} pair is required")
    for i, p in enumerate(pairs):
        if not p.inbox.exists():
            fail(i, "inbox", f"folder {p.inbox} does not exist")
        if not p.inbox.is_dir():
            fail(i, "inbox", f"{p.inbox} is not a folder")
        named = p.written_folders()
        for key, folder in named.items():
            if is_within(folder, p.inbox):
                fail(i, key, f"{folder} must not be inside inbox {p.inbox}")
            if is_within(p.inbox, folder):
                fail(i, key, f"{folder} must not contain inbox {p.inbox}")
        if is_within(cache_dir, p.inbox):
            fail(i, "inbox", f"cache.dir {cache_dir} must not be inside it")
        for a, b in (("outbox", "failed_dir"), ("outbox", "done_dir"), ("failed_dir", "done_dir"),
                     ("outbox", "review.dir"), ("failed_dir", "review.dir"),
                     ("done_dir", "review.dir")):
            if b not in named:
                continue
            if is_within(named[a], named[b]) or is_within(named[b], named[a]):
                fail(i, b, f"{named[b]} overlaps {a} {named[a]}")
        for j, q in enumerate(pairs[:i]):
            if is_within(p.inbox, q.inbox) or is_within(q.inbox, p.inbox):
                fail(i, "inbox", f"{p.inbox} overlaps watch[{j}].inbox {q.inbox}")
            if p.outbox == q.outbox:
                fail(i, "outbox", f"{p.outbox} is also watch[{j}].outbox")
    for i, p in enumerate(pairs):  # nothing a pair writes may land in another pair's inbox
        for j, q in enumerate(pairs):
            if j == i:
                continue
            for key, folder in p.written_folders().items():
                if is_within(folder, q.inbox) or is_within(q.inbox, folder):
                    fail(i, key, f"{folder} overlaps watch[{j}].inbox {q.inbox}")
