"""Shared by the bench scripts: the config writer (the tests' own) and the process-tree RSS sampler."""
from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import write_config as _write_config  # noqa: E402

now = time.monotonic
# the tests' config writer, with the daemon's own default timings
write_config = functools.partial(_write_config, fast=False)


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Sampler(threading.Thread):
    """A process tree's RSS now and every ``interval`` s after, until ``finish()``.

    ``samples``: one dict each: ``t`` (monotonic s), ``rss`` (bytes, the whole tree) and
    what ``extra(process)`` returns (open fds, CPU time...). A gone process is not sampled.
    """

    def __init__(self, pid: int, interval: float = 0.05,
                 extra: Callable[[psutil.Process], dict] | None = None):
        super().__init__(name=f"sampler-{pid}", daemon=True)
        self.pid, self.interval, self.extra = pid, interval, extra
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self.sample()
        self.start()

    def sample(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                row = {"t": now(), "rss": tree_rss(self.pid),
                       **(self.extra(proc) if self.extra else {})}
        except psutil.Error:
            return
        if row["rss"]:
            self.samples.append(row)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def finish(self) -> None:
        self._halt.set()
        self.join(5)

    @property
    def series(self) -> list[tuple[float, int]]:
        return [(s["t"], s["rss"]) for s in self.samples]

    @property
    def peak(self) -> int:
        return max((s["rss"] for s in self.samples), default=0)
