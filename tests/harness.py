"""Run a real `rembgd run` process in tests and observe it from outside."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class Daemon:
    def __init__(self, config: Path, log: Path | None = None, env: dict | None = None):
        self.config = Path(config)
        self.log = Path(log or self.config.with_name(f"daemon-{time.time_ns()}.log"))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> Daemon:
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "-c", str(self.config), "--log-format", "json", "run"],
            stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait_ready:
            self.wait_log(lambda e: e.get("event") == "started", timeout=60)
        return self

    # ------------------------------------------------------------ logs
    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def processed(self) -> list[dict]:
        return [e for e in self.events() if e.get("event") == "processed"]

    def wait_log(self, pred, timeout: float = 60, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if pred(e)]
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {count} log event(s):\n{self.tail()}")

    def wait_processed(self, n: int, timeout: float = 90) -> list[dict]:
        return self.wait_log(lambda e: e.get("event") == "processed" and e.get("outcome") != "retry",
                             timeout=timeout, count=n)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    # ----------------------------------------------------------- status
    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "daemon", "-c", str(self.config), "status", "--json"],
                             capture_output=True, text=True, cwd=ROOT)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def quiet(self, ticks: int = 2, timeout: float = 30) -> dict:
        """Wait until the daemon was idle (nothing queued, settling or in progress) at
        ``ticks`` ticks in a row, all after this call: whatever it would have done about
        what happened before, it has done. The status file is rewritten every tick."""
        return self.wait_ticks(ticks, idle=True, timeout=timeout)

    def wait_ticks(self, ticks: int, *, idle: bool = False, timeout: float = 30) -> dict:
        """Wait until the daemon's main loop ran ``ticks`` more ticks (each one publishes
        the status, probes the cache and the inboxes); ``idle``: all of them idle."""
        from daemon import config as configmod
        from daemon.service.status import read_status

        path = configmod.state_path(configmod.load(self.config))
        start = (read_status(path) or {}).get("ticks", 0)
        return wait_for(lambda: (s := read_status(path)) and s.get("ticks", 0) >= start + ticks
                        and (not idle or s.get("idle_ticks", 0) >= ticks) and s,
                        timeout=timeout)

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    # ------------------------------------------------------------ stop
    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._fh.close()

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._fh.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        try:
            self._fh.close()
        except Exception:
            pass


def wait_for(pred, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def complete_pngs(folder: Path) -> list[Path]:
    """Visible outputs; each must decode fully (no partial file is ever visible)."""
    from PIL import Image

    outs = sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))
    for p in outs:
        with Image.open(p) as im:
            im.load()
    return outs


def hold_two_cutouts(daemon: Daemon, config: Path, inbox: Path) -> list[dict]:
    """Reload ``daemon`` so that its (first) pair holds every cutout for review, drop two
    real photos and wait until both are held; their ``review_held`` log events."""
    import yaml

    from tests.helpers import encode, photo

    data = yaml.safe_load(config.read_text())
    data["watch"][0]["review"] = {"min_confidence": 1.0}
    config.write_text(yaml.safe_dump(data))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log(lambda e: e.get("event") == "config_reloaded")
    for name, shot in (("a.jpg", "coffee"), ("b.jpg", "astronaut")):
        (inbox / name).write_bytes(encode(photo(shot)[::4, ::4]))
    return daemon.wait_log(lambda e: e.get("event") == "review_held", count=2)[-2:]
