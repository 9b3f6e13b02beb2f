"""Previews and thumbnails made ahead of time, so an item's first view is served from disk.

When an output is delivered, held for review, approved or touched up, the daemon hands
its source and outputs here (``want``), which never blocks: the files go on a bounded
queue (a full queue drops them; they are then made on first view, as before). One
background thread, at the lowest CPU priority the system gives a thread, makes them
one file at a time with the same ``Thumbnails`` the server reads from (cached on disk,
written atomically, trimmed to a bound), so the workers keep the CPU and a file is
never made twice at once by this thread.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import structlog

from daemon.web.thumbs import ThumbnailError, Thumbnails

log = structlog.get_logger("rembgd.web")

DEPTH = 256  # files waiting; more are dropped (made on first view instead)


class Prefetcher:
    def __init__(self, makers: list[Thumbnails], depth: int = DEPTH):
        self.makers = makers
        self._queue: queue.Queue[tuple[Path, Path] | None] = queue.Queue(depth)
        self._pending: set[tuple[Path, Path]] = set()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.made = self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="web-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # the thread is a daemon thread: it dies with the process
                pass
            self._thread.join(timeout=5)
            self._thread = None

    def want(self, root: Path, rel: Path) -> bool:
        """Make ``root/rel``'s previews soon; False if it was dropped (queue full)."""
        key = (Path(root), Path(rel))
        with self._idle:
            if key in self._pending:
                return True
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                self.dropped += 1
                return False
            self._pending.add(key)
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Whether everything wanted so far was made (or failed) within ``timeout`` s."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def _run(self) -> None:
        _lowest_priority()
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                for maker in self.makers:
                    maker.get(*key)
                self.made += 1
            except FileNotFoundError:
                pass  # moved on (approved, retried) before its turn
            except (OSError, ThumbnailError) as exc:
                log.debug("web_prefetch_failed", path=str(key[1]), error=str(exc))
            except Exception:  # a bug: logged; the thread carries on
                log.exception("web_prefetch_error", path=str(key[1]))
            finally:
                with self._idle:
                    self._pending.discard(key)
                    self._idle.notify_all()


def _lowest_priority() -> None:
    """This thread (Linux: a thread has its own nice value) at nice 19."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
