"""Which inbox files are work: ignore patterns, up-to-date checks and folder scans."""
from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path
from typing import Iterator

from daemon.fsutil import is_temp_name, output_name


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Temp, hidden and OS clutter names (``._*``, ``*.part``, ``Thumbs.db``...)."""
    if is_temp_name(name):
        return True
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.lower(), p.lower())
               for p in patterns)


def ignored_path(rel: Path, patterns: tuple[str, ...]) -> bool:
    return any(is_ignored(part, patterns) for part in rel.parts)


def output_is_current(src_stat: os.stat_result, out: Path) -> bool:
    """An output newer than its source means the source was already processed."""
    try:
        return out.stat().st_mtime_ns >= src_stat.st_mtime_ns
    except OSError as exc:
        # no output yet, or one that cannot exist (a name over NAME_MAX, a file where a
        # folder of its path should be): not current, and the pipeline reports why
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return False
        raise


def walk(inbox: Path, recursive: bool, patterns: tuple[str, ...]) -> Iterator[tuple[Path, Path]]:
    """(absolute path, path relative to inbox) of candidate files; never follows symlinks."""
    for root, dirs, files in os.walk(inbox, followlinks=False):
        rel_root = Path(root).relative_to(inbox)
        dirs[:] = sorted(d for d in dirs if not is_ignored(d, patterns)) if recursive else []
        for name in sorted(files):
            if not is_ignored(name, patterns):
                yield Path(root) / name, rel_root / name


def pending(inbox: Path, outbox: Path, recursive: bool,
            patterns: tuple[str, ...]) -> Iterator[tuple[Path, Path]]:
    """Inbox files without an up-to-date output (the catch-up scan)."""
    for path, rel in walk(inbox, recursive, patterns):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not output_is_current(st, outbox / output_name(rel)):
            yield path, rel
