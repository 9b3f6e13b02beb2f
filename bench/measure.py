"""Measuring tools for bench/run.py: output timing, process monitoring, a daemon launcher."""
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

from common import Sampler, now, tree, tree_cpu

ROOT = Path(__file__).resolve().parents[1]


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


class Monitor:
    """A ``Sampler`` per labelled process tree: RSS and CPU time every ``interval`` s, and the
    inet peers it connects to (every third sample) when asked."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.samplers: dict[str, Sampler] = {}
        self.remote: dict[str, set[str]] = {}

    def watch(self, label: str, pid: int, net: bool = False) -> None:
        peers = self.remote.setdefault(label, set())

        def extra(_proc: psutil.Process) -> dict:
            sampler = self.samplers.get(label)
            if net and (sampler is None or len(sampler.samples) % 3 == 0):
                peers.update(inet_peers(pid))
            return {"cpu": tree_cpu(pid)}

        self.samplers[label] = Sampler(pid, self.interval, extra)

    def unwatch(self, label: str) -> None:
        if label in self.samplers:
            self.samplers[label].finish()

    def series(self, label: str) -> list[tuple[float, int, float]]:
        """(t, rss, cpu s) of every sample."""
        sampler = self.samplers.get(label)
        return [(s["t"], s["rss"], s["cpu"]) for s in sampler.samples] if sampler else []

    def peak(self, label: str) -> int:
        return self.samplers[label].peak if label in self.samplers else 0

    def cpu_since(self, label: str, t: float) -> tuple[float, float] | None:
        """(time, cpu seconds) of the first sample at or after ``t``."""
        return next(((s[0], s[2]) for s in self.series(label) if s[0] >= t), None)

    def stop(self) -> None:
        for sampler in self.samplers.values():
            sampler.finish()


def inet_peers(pid: int) -> set[str]:
    found = set()
    for p in tree(pid):
        try:
            found.update(f"{c.raddr.ip}:{c.raddr.port}"
                         for c in p.net_connections(kind="inet") if c.raddr)
        except psutil.Error:
            pass
    return found


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
