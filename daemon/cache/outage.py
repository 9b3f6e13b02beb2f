"""Whether the cache is down, recorded in one place: ``Outage``.

One ``Outage`` per opened cache (``daemon.service.app.open_cache`` makes it).
The ``CacheGuard`` owns and reports it (the log, once per outage, and the
status file); for Redis, the ``RedisLink`` that the store and its locks share
records into the same object, so its fail-fast window is part of the one state.
It holds two things:

* the outage: set on the first failure (``note``; True once per outage, for
  the log line), whose error is its ``cause``, kept once; later failures of the
  same outage only count (``failures``), so ``error`` stays one line however
  long it lasts (a fail-fast message quoting the error is never quoted again);
  cleared by ``clear`` (a re-open worked) or by ``quiet`` once
  ``retry_s`` has passed without a failure (when reads work and writes fail,
  e.g. a read-only cache folder, the log would otherwise flip on every file);
* the fail-fast window: after the backend could not be reached at all
  (``unreachable``), ``check`` fails calls at once with ``StoreUnavailable`` for
  a backoff (0.5 s, doubling per consecutive failure, at most 30 s); then one
  call tries again, and a call that gets through (``reached``) ends the window.
"""
from __future__ import annotations

import threading
import time

from daemon.cache.base import StoreUnavailable


class Outage:
    BACKOFF_START_S = 0.5
    BACKOFF_MAX_S = 30.0

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.down = False  # an outage is going on (logged, shown in the status)
        self.cause: str | None = None  # the error that started it, kept once
        self.failures = 0  # failures in this outage, the first included
        self.count = 0  # outages so far
        self._failed_at = 0.0
        self.unreachable = False  # the last call could not reach the backend at all
        self.unreachable_error: str | None = None  # why (the backend's own error)
        self._until = 0.0  # end of the fail-fast window
        self._backoff = self.BACKOFF_START_S

    # ------------------------------------------------------------ the outage

    @property
    def error(self) -> str | None:
        """The outage's cause once, and how many failures it has had; None when up."""
        with self._mutex:
            if not self.down:
                return self.unreachable_error if self.unreachable else None
            more = self.failures - 1
            return self.cause + (f" (and {more} more failure{'s' * (more != 1)} since)"
                                 if more > 0 else "")

    def note(self, error: str) -> bool:
        """A failure; True when it starts an outage (``error`` becomes its cause)."""
        with self._mutex:
            self._failed_at = time.monotonic()
            first = not self.down
            if first:
                self.down, self.cause, self.failures = True, error, 0
                self.count += 1
            self.failures += 1
            return first

    def quiet(self, retry_s: float) -> bool:
        """End the outage once ``retry_s`` has passed without a failure; True if it ended."""
        with self._mutex:
            if not self.down or time.monotonic() - self._failed_at < retry_s:
                return False
            self.down, self.cause, self.failures = False, None, 0
            return True

    def clear(self) -> bool:
        """End the outage now (the store was re-opened); True if there was one."""
        with self._mutex:
            ended, self.down, self.cause, self.failures = self.down, False, None, 0
            return ended

    # ------------------------------------------------------ fail-fast window

    def check(self, what: str) -> None:
        """Raise ``StoreUnavailable`` at once while the fail-fast window is open; its
        message quotes the backend's own error, never an earlier message of this kind."""
        left = self._until - time.monotonic()
        if self.unreachable and left > 0:
            raise StoreUnavailable(f"{what} unavailable ({self.unreachable_error}); "
                                   f"retrying in {left:.1f}s")

    @property
    def probe_due(self) -> bool:
        """The backend was unreachable and the window has passed: one call may try."""
        return self.unreachable and time.monotonic() >= self._until

    def unreachable_now(self, error: str) -> None:
        """The backend could not be reached: open (or, after the window, widen) the window."""
        now = time.monotonic()
        with self._mutex:
            self.unreachable_error = error
            if not self.unreachable:
                self.unreachable = True
                self._backoff = self.BACKOFF_START_S
            elif now < self._until:
                return  # another thread's failure already set this window
            else:
                self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
            self._until = now + self._backoff

    def reached(self) -> bool:
        """A call got through: close the window; True if it was open."""
        if not self.unreachable:
            return False
        with self._mutex:
            was, self.unreachable = self.unreachable, False
            self._backoff = self.BACKOFF_START_S
            return was
