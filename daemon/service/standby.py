"""Standby: a pair whose folders are unusable (a share outage) waits instead of failing.

When an inbox, outbox, ``failed/`` or ``done/`` folder is missing, read-only or
not writable, the pair goes to standby: it is logged once, shown in the
status, and its files are re-queued with a capped backoff (no attempt is
counted and nothing goes to ``failed/``). It resumes on its own when every
folder works again. Only a fault of one file is that file's failure.
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.config import WatchPair

log = structlog.get_logger("rembgd.service")

MAX_BACKOFF_S = 60.0
OUTAGE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.EHOSTDOWN,
                 errno.ENOTCONN, errno.ETIMEDOUT}


@dataclass
class Outage:
    reason: str
    since: float
    tries: int = 0
    next_try: float = 0.0  # monotonic time of the pair's next probe


def folder_problem(pair: WatchPair) -> str | None:
    """Why the pair cannot work now (a missing or unwritable folder), or None.

    The inbox must be a readable folder; the outbox (made at start, so missing means
    the share is gone) and failed/ and done/ (those that exist or whose parent
    exists: they are made on first use) must accept a new file: a probe file is
    created and removed, because on a share neither mode bits nor ``os.access`` tell.
    """
    try:
        if not os.path.isdir(pair.inbox):
            return f"inbox {pair.inbox} is missing"
        os.listdir(pair.inbox)
    except OSError as exc:
        return f"inbox {pair.inbox} is unreadable: {exc.strerror or exc}"
    folders = [("outbox", pair.outbox), ("failed_dir", pair.failed_dir)]
    if pair.after_success == "move":
        folders.append(("done_dir", pair.done_dir))
    for key, folder in folders:
        problem = _probe(folder, must_exist=key == "outbox")
        if problem is not None:
            return f"{key} {folder}: {problem}"
    return None


def _probe(folder: Path, *, must_exist: bool = False) -> str | None:
    if must_exist and not folder.is_dir():
        return "missing"
    target = folder if folder.exists() else folder.parent  # created on first use
    if not target.is_dir():
        return "missing (and so is its parent folder)"
    probe = target / f".rembgd-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return None  # another thread's probe: the folder takes new files
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


class Standby:
    """Which pairs are on standby, since when and why; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: dict[str, Outage] = {}  # by pair key

    def check(self, pair: WatchPair) -> float | None:
        """None when the pair works (leaving standby if it was on it); else the delay
        after which its file should be tried again.

        The backoff belongs to the pair, not to each file: while on standby every file
        is told to come back at the pair's next probe, and only a call at or after that
        time probes again (and backs off further). So many files arriving during an
        outage neither probe the share each nor push each other's retry out to the cap,
        and all of them resume together right after the probe that finds it working."""
        with self._lock:
            outage = self._pairs.get(pair.key)
            now = time.monotonic()
            if outage is not None and now < outage.next_try:
                return outage.next_try - now
        problem = folder_problem(pair)
        with self._lock:
            outage = self._pairs.get(pair.key)
            now = time.monotonic()
            if outage is not None and now < outage.next_try:  # another thread probed meanwhile
                return outage.next_try - now
            if problem is None:
                if outage is not None:
                    del self._pairs[pair.key]
                    log.warning("pair_resumed", inbox=str(pair.inbox),
                                after_s=round(time.time() - outage.since, 1))
                return None
            if outage is None:
                outage = self._pairs[pair.key] = Outage(problem, time.time())
                log.error("pair_standby", inbox=str(pair.inbox), reason=problem,
                          effect="its files wait in the inbox; it resumes on its own")
            outage.reason = problem
            outage.tries += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** min(outage.tries, 6))
            outage.next_try = now + delay
            return delay

    def wake(self, key: str) -> None:
        """Let the next ``check`` of the pair probe now (a missing folder came back)."""
        with self._lock:
            outage = self._pairs.get(key)
            if outage is not None:
                outage.next_try = 0.0

    def active(self, key: str) -> bool:
        with self._lock:
            return key in self._pairs

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {key: {"reason": o.reason, "since": o.since} for key, o in self._pairs.items()}


def is_outage_error(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUTAGE_ERRNOS
