"""Which inbox files are work: ignore patterns (and why) and folder scans."""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterator

from daemon.fsutil import is_temp_name


def ignore_reason(name: str, patterns: tuple[str, ...]) -> str | None:
    """Why ``name`` is skipped (for the log), or None when it is work.

    Only rembgd's exact temp-name pattern counts as its own temp file: a studio's
    ``photo.rembgd-final.jpg`` is processed like any other photo.
    """
    if is_temp_name(name):
        return "a rembgd temp file"
    low = name.lower()
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(low, p.lower()):
            return f"matches the ignore pattern {p!r}"
    return None


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Temp, hidden and OS clutter names (``._*``, ``*.part``, ``Thumbs.db``...)."""
    return ignore_reason(name, patterns) is not None


def path_ignore_reason(rel: Path, patterns: tuple[str, ...]) -> str | None:
    """Why a path relative to the inbox is skipped, naming the component; None if it is work."""
    for i, part in enumerate(rel.parts):
        why = ignore_reason(part, patterns)
        if why is not None:
            where = "its name" if i == len(rel.parts) - 1 else f"folder {Path(*rel.parts[:i + 1])}"
            return f"{where}: {why}"
    return None


def ignored_path(rel: Path, patterns: tuple[str, ...]) -> bool:
    return path_ignore_reason(rel, patterns) is not None


def walk(inbox: Path, recursive: bool, patterns: tuple[str, ...]) -> Iterator[tuple[Path, Path]]:
    """(absolute path, path relative to inbox) of candidate files; never follows symlinks."""
    for root, dirs, files in os.walk(inbox, followlinks=False):
        rel_root = Path(root).relative_to(inbox)
        dirs[:] = sorted(d for d in dirs if not is_ignored(d, patterns)) if recursive else []
        for name in sorted(files):
            if not is_ignored(name, patterns):
                yield Path(root) / name, rel_root / name
