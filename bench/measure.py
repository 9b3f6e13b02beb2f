"""Measuring tools for bench/run.py: output timing, process-tree sampling, a daemon launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

ROOT = Path(__file__).resolve().parents[1]
now = time.monotonic


# ------------------------------------------------------------------ outputs


class OutputRecorder(FileSystemEventHandler):
    """First time each output is complete in a folder, via inotify.

    rembgd writes a hidden temp file and renames it (a moved event); rembg
    writes the final name in place (a closed-after-write event). Either marks
    the output as complete. Hidden names (temp files) are ignored.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}
        self.cv = threading.Condition()
        self.observer = Observer()
        self.observer.schedule(self, str(self.folder), recursive=False)
        self.observer.start()

    def _mark(self, path: str) -> None:
        name = os.path.basename(path)
        if name.startswith("."):
            return
        t = now()
        with self.cv:
            if name not in self.times:
                self.times[name] = t
                self.cv.notify_all()

    def on_any_event(self, event) -> None:
        if isinstance(event, FileMovedEvent):
            self._mark(event.dest_path)
        elif isinstance(event, FileClosedEvent):
            self._mark(event.src_path)

    def count(self) -> int:
        with self.cv:
            return len(self.times)

    def wait(self, names: set[str] | int, timeout: float, alive=None) -> bool:
        """Wait until all ``names`` (or that many outputs) are complete; False on timeout."""
        deadline = now() + timeout
        with self.cv:
            while True:
                done = (len(self.times) >= names if isinstance(names, int)
                        else names.issubset(self.times.keys()))
                if done:
                    return True
                left = deadline - now()
                if left <= 0 or (alive is not None and not alive()):
                    return done
                self.cv.wait(min(left, 0.5))

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)


# ---------------------------------------------------------------- processes


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


class Monitor(threading.Thread):
    """Samples the RSS of registered process trees (and, if asked, their inet sockets)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(name="monitor", daemon=True)
        self.interval = interval
        self.lock = threading.Lock()
        self.pids: dict[str, tuple[int, bool]] = {}
        self.series: dict[str, list[tuple[float, int, float]]] = {}  # (t, rss, cpu s)
        self.remote: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._tick = 0

    def watch(self, label: str, pid: int, net: bool = False) -> None:
        with self.lock:
            self.pids[label] = (pid, net)
            self.series.setdefault(label, [])
            self.remote.setdefault(label, set())
        self._sample(label, pid, net)

    def unwatch(self, label: str) -> None:
        with self.lock:
            self.pids.pop(label, None)

    def peak(self, label: str) -> int:
        return max((s[1] for s in self.series.get(label, [])), default=0)

    def cpu_since(self, label: str, t: float) -> tuple[float, float] | None:
        """(time, cpu seconds) of the first sample at or after ``t``."""
        with self.lock:
            for s in self.series.get(label, []):
                if s[0] >= t:
                    return s[0], s[2]
        return None

    def _sample(self, label: str, pid: int, net: bool) -> None:
        t, rss, cpu = now(), tree_rss(pid), tree_cpu(pid)
        if rss:
            with self.lock:
                self.series[label].append((t, rss, cpu))
        if net:
            for p in tree(pid):
                try:
                    for c in p.net_connections(kind="inet"):
                        if c.raddr:
                            self.remote[label].add(f"{c.raddr.ip}:{c.raddr.port}")
                except psutil.Error:
                    pass

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick += 1
            with self.lock:
                items = list(self.pids.items())
            for label, (pid, net) in items:
                self._sample(label, pid, net and self._tick % 3 == 0)

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------- drops


def drop_rename(folder: Path, name: str, data: bytes) -> float:
    """Write under a hidden temp name, then rename into place (rsync, Samba, NAS clients)."""
    tmp = folder / f".{name}.part"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.rename(tmp, folder / name)
    return now()


def drop_direct(folder: Path, name: str, data: bytes) -> float:
    """Write the final name directly (a local copy)."""
    with open(folder / name, "wb") as fh:
        fh.write(data)
    return now()


# ------------------------------------------------------------------ daemon


class LogTail:
    """Incremental reader of a JSON-lines log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pos = 0
        self.buf = b""
        self.events: list[dict] = []

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        new = []
        for line in lines:
            try:
                new.append(json.loads(line))
            except ValueError:
                continue
        self.events.extend(new)
        return new


class Daemon:
    """A real ``rembgd run`` process with JSON logs."""

    def __init__(self, config: Path, log: Path, env: dict):
        self.config, self.log, self.env = Path(config), Path(log), env
        self.tail = LogTail(self.log)
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def start(self, timeout: float = 120) -> "Daemon":
        self._fh = open(self.log, "ab")
        t0 = now()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "-c", str(self.config), "--log-format", "json", "run"],
            stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        self.wait_event(lambda e: e.get("event") == "started", timeout)
        self.startup_s = now() - t0
        return self

    def wait_event(self, pred, timeout: float, count: int = 1) -> list[dict]:
        deadline = now() + timeout
        while True:
            self.tail.poll()
            found = [e for e in self.tail.events if pred(e)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"rembgd exited ({self.proc.returncode}); see {self.log}")
            if now() > deadline:
                raise TimeoutError(f"rembgd: {len(found)}/{count} events in {timeout:.0f}s; see {self.log}")
            time.sleep(0.05)

    def processed(self) -> dict[str, dict]:
        """Final outcome per source path (retries excluded)."""
        self.tail.poll()
        return {e["path"]: e for e in self.tail.events
                if e.get("event") == "processed" and e.get("outcome") != "retry"}

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -------------------------------------------------------------------- stats


def pct(values, q: float) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None
