"""Small WebP thumbnails (alpha kept), made on request and cached on disk.

A thumbnail is keyed by the file's identity (path, device, inode, size, mtime), so a
rewritten output gets a new one and a stale one is never shown; one file is made once
at a time (a request while the prefetcher, ``daemon.web.prefetch``, makes it waits for
that one). Files are opened
link-proof under their root. JPEG sources are decoded in draft mode (a 24 MP photo in
a fraction of the full decode); at most two thumbnails are made at once, so a page of
them never starves the workers. The folder is trimmed to ``keep`` files, oldest first.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from daemon.fsutil import atomic_write_bytes
from daemon.imaging.decode import register_codecs
from daemon.nofollow import open_under

SIZE = 256
WAIT_FOR_OTHER_S = 2.0  # the longest a request waits for another thread making its file


class ThumbnailError(ValueError):
    """The file is not an image Pillow can make a thumbnail of (or it is too big)."""

TRIM_EVERY = 100


class Thumbnails:
    def __init__(self, folder: Path, size: int = SIZE, keep: int = 5000):
        self.folder, self.size, self.keep = folder, size, keep
        self._making = threading.BoundedSemaphore(2)
        self._lock = threading.Lock()
        self._made = 0
        self._files: dict[Path, threading.Lock] = {}  # one making per file at a time

    def get(self, root: Path, rel: Path) -> bytes:
        """The WebP thumbnail of ``root/rel``: cached, or made now. OSError if the file
        cannot be read through plain folders; ThumbnailError if it is no usable image."""
        with open_under(root, rel) as fh:
            st = os.fstat(fh.fileno())
            identity = f"{os.path.realpath(root)}\0{rel}\0{st.st_dev}\0{st.st_ino}\0" \
                       f"{st.st_size}\0{st.st_mtime_ns}\0{self.size}"
            path = self.folder / (hashlib.sha1(identity.encode()).hexdigest() + ".webp")
            try:
                return path.read_bytes()
            except FileNotFoundError:
                pass
            with self._lock:
                file_lock = self._files.setdefault(path, threading.Lock())
            # a request while the (niced) prefetcher makes this file waits for that one,
            # but not for long: then it makes the file itself, at its own priority
            held = file_lock.acquire(timeout=WAIT_FOR_OTHER_S)
            try:
                try:
                    return path.read_bytes()
                except FileNotFoundError:
                    pass
                with self._making:
                    try:
                        data = self._make(fh)
                    except (OSError, ValueError, SyntaxError,
                            Image.DecompressionBombError) as exc:
                        raise ThumbnailError(f"{type(exc).__name__}: {exc}") from None
                atomic_write_bytes(path, data)
            finally:
                with self._lock:
                    if held:
                        file_lock.release()
                    if not file_lock.locked():
                        self._files.pop(path, None)
        self._note_made()
        return data

    def _make(self, fh) -> bytes:
        register_codecs()
        with Image.open(fh) as img:
            img.draft("RGB", (self.size * 2, self.size * 2))  # JPEG only; others ignore it
            img = ImageOps.exif_transpose(img)
            img.thumbnail((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info
                                  else "RGB")
            out = io.BytesIO()
            img.save(out, "WEBP", quality=80, method=2)
        return out.getvalue()

    def _note_made(self) -> None:
        with self._lock:
            self._made += 1
            if self._made % TRIM_EVERY:
                return
        entries = sorted(os.scandir(self.folder), key=lambda e: e.stat().st_mtime)
        for entry in entries[:max(0, len(entries) - self.keep)]:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
