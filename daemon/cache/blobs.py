"""Content-addressed blob files for the embedded store: ``blobs/ab/abcdef...``.

Owns the blob folder: a blob's file is named by the sha256 of its bytes, every
read is checked against that name, and a file that does not match is removed
and reads as absent (the caller drops the row that pointed at it). Writes are
atomic (``daemon.fsutil``) but not fsynced: a blob a crash tore reads as absent,
a miss, so a miss need not wait for the disk (two blobs a miss, ~5-7 ms each here).
An existing file is reused only when its bytes are the same, so a later ``put`` of
the same data repairs a damaged file.
Raises ``OSError``; ``daemon.cache.sqlite.SqliteStore`` turns it into
``StoreUnavailable``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from daemon.fsutil import atomic_write_bytes


class BlobDir:
    """Content-addressed files; a read whose sha256 does not match is treated as absent.

    Raises ``OSError``; ``SqliteStore`` turns it into ``StoreUnavailable``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data``; an existing file is reused only when its bytes are the same."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        try:
            same = path.stat().st_size == len(data) and path.read_bytes() == data
        except (FileNotFoundError, IsADirectoryError):
            same = False
        if not same:
            atomic_write_bytes(path, data, durable=False)  # every read is verified
        return digest

    def get(self, digest: str) -> bytes | None:
        try:
            data = self.path(digest).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            try:
                self.path(digest).unlink()  # repair: the row goes too, via the caller
            except OSError:
                pass
            return None
        return data

    def mtime(self, digest: str) -> float | None:
        """When the blob's file was written (None: absent)."""
        try:
            return self.path(digest).stat().st_mtime
        except OSError:
            return None

    def delete(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if len(f.name) == 64 and not f.name.startswith("."):
                        yield f.name
