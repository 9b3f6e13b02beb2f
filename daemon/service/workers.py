"""Workers: the bounded queue, the worker threads and the retry policy.

A path a worker is already on is not taken twice (a second event for it is
counted as a duplicate; a retry passes). A ModelError is not the file's
fault: it is reported through ``on_model_error`` and the file stays queued for
the next start (or the next good reload).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

import structlog

from daemon.fate import Kind, Outcome, finish
from daemon.inference.models import ModelError
from daemon.service.intake import WorkItem
from daemon.service.status import Counters

log = structlog.get_logger("rembgd.service")


class RetryPolicy:
    """Transient failures are retried with exponential backoff, then given up on."""

    def __init__(self, schedule: Callable[[WorkItem, float], None], counters: Counters,
                 attempts: Callable[[], int], backoff_s: Callable[[], float]):
        self._schedule = schedule
        self.counters = counters
        self._attempts = attempts
        self._backoff_s = backoff_s

    def retry(self, item: WorkItem, outcome: Outcome) -> bool:
        """Schedule the next attempt, or give up (failed for good): whether it gave up."""
        if item.attempt < self._attempts():
            delay = self._backoff_s() * (2 ** item.attempt)
            self.counters.add("retries")
            log.info("retry_scheduled", path=str(item.path), attempt=item.attempt + 1,
                     delay_s=delay, error=outcome.error)
            self._schedule(replace(item, attempt=item.attempt + 1), delay)
            return False
        self.counters.add(Kind.FAILED)
        log.error("giving_up", path=str(item.path), attempts=item.attempt + 1, error=outcome.error)
        finish(outcome.given_up(item.attempt + 1))
        return True

    def later(self, item: WorkItem, delay: float) -> None:
        """Try again after ``delay`` without counting an attempt (claimed elsewhere)."""
        self._schedule(item, delay)


class Workers:
    def __init__(self, size: int, queue_size: int, handle: Callable[[WorkItem], str],
                 counters: Counters, stop: threading.Event,
                 on_model_error: Callable[[ModelError], None]):
        self.queue: queue.Queue[WorkItem | None] = queue.Queue(maxsize=queue_size)
        self.size = size
        self.handle = handle
        self.counters = counters
        self.stop_event = stop
        self.on_model_error = on_model_error
        self.threads: list[threading.Thread] = []
        self.in_progress = 0
        self._lock = threading.Lock()
        self._active: set[Path] = set()

    def start(self) -> None:
        for n in range(self.size):
            t = threading.Thread(target=self._loop, name=f"worker-{n}", daemon=True)
            t.start()
            self.threads.append(t)

    def submit(self, item: WorkItem) -> None:
        """Blocks while the queue is full (back-pressure), until stopped."""
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                self.counters.add("queued_total")
                return
            except queue.Full:
                continue

    def busy_paths(self) -> list[Path]:
        """The files workers are on now."""
        with self._lock:
            return list(self._active)

    def join(self, timeout: float = 600) -> None:
        for t in self.threads:
            t.join(timeout=timeout)  # the current file finishes; nothing new starts

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None or self.stop_event.is_set():
                self.queue.task_done()
                return  # anything still queued stays in the inbox for the next start
            with self._lock:
                self.in_progress += 1
                duplicate = item.attempt == 0 and item.path in self._active  # retries pass
                self._active.add(item.path)
            try:
                if duplicate:  # a second event for a file a worker is on: that worker
                    self.counters.add("duplicates")  # finishes it, or retries if it changed
                else:
                    self.handle(item)
            except ModelError as exc:
                self.on_model_error(exc)
            except Exception:
                log.exception("worker_error", path=str(item.path))
                self.counters.add("internal_errors")
            finally:
                with self._lock:
                    self.in_progress -= 1
                    if not duplicate:
                        self._active.discard(item.path)
                self.queue.task_done()
