"""The live status: counters, the status dict and file `rembgd status` reads, STATUS= lines."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

from daemon.cache.base import Tier
from daemon.fate import Kind
from daemon.fsutil import atomic_write_bytes, temp_name, unlink_quietly


class Counters:
    """Thread-safe counters for the status file, logs and sd_notify STATUS= lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


def status_line(state: str, c: dict[str, int], queued: int) -> str:
    """``idle; since start: 3 hits / 1 misses, 1 failed; 2 queued now``: the counts are
    totals since the daemon started, the queue is what waits now (omitted when 0)."""
    hits = sum(c.get(t, 0) for t in Tier if t.is_hit)
    text = f"{state}; since start: {hits} hits / {c.get(Tier.MISS, 0)} misses"
    if c.get(Kind.REVIEW):
        text += f", {c[Kind.REVIEW]} held for review"
    if c.get(Kind.FAILED):
        text += f", {c[Kind.FAILED]} failed"
    if queued:
        text += f"; {queued} queued now"
    return text


def queue_depth(sup) -> int:
    """Files of a running Supervisor queued or settling; not those waiting to become
    complete."""
    return sup.workers.queue.qsize() + max(0, len(sup.scheduler) - len(sup.scheduler.waiting()))


def build_status(sup) -> dict:
    """The status of a running Supervisor, as written to the status file."""
    c = sup.counters.snapshot()
    queued = queue_depth(sup)
    state = sup.state
    if state == "running":
        state = "busy" if queued or sup.workers.in_progress else "idle"
        if sup.standby.snapshot():
            state = "standby"
    app = sup.app
    guard = app.cache.guard if app is not None and app.cache is not None else None
    return {
        "pid": os.getpid(),
        "state": state,
        "started": sup.started,
        "updated": time.time(),
        "config": str(sup.cfg.source),
        "observer": sup.observer_kind,
        "queued": queued,
        "in_progress": sup.workers.in_progress,
        "counters": c,
        "inferences": app.pipeline.inferences if app is not None else 0,
        "events_seen": sum(h.events for h in sup.handlers),
        "ticks": sup.publisher.ticks,  # the main loop's ticks (about 1 s); idle_ticks: idle
        "idle_ticks": sup.publisher.idle_ticks,  # ones in a row
        "incomplete": len(sup.scheduler.waiting()),  # files waiting to finish copying
        "standby": sup.standby.snapshot(),
        "web": sup.web.url,  # the status page, or None
        "cache": guard.status() if guard is not None else {"backend": "disabled",
                                                           "available": False},
        "line": status_line(state, c, queued),
    }


def progress_fields(st: dict) -> dict:
    counts = st["counters"]
    hits = sum(counts.get(t, 0) for t in Tier if t.is_hit)
    return {"queued": st["queued"], "in_progress": st["in_progress"],
            "done": hits + counts.get(Tier.MISS, 0), "hits": hits,
            "misses": counts.get(Tier.MISS, 0), "failed": counts.get(Kind.FAILED, 0)}


def write_status(path: Path, data: dict, *, durable: bool = True) -> None:
    """Atomically; ``durable`` False skips the fsyncs (the tick counters, every second)."""
    text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    if durable:
        atomic_write_bytes(path, text)
        return
    tmp = path.with_name(temp_name(path.name))
    try:
        tmp.write_bytes(text)
        os.replace(tmp, path)
    except OSError:
        unlink_quietly(tmp)
        raise


def read_status(path: Path) -> dict | None:
    """The status, with ``running`` checked against the recorded pid."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    alive = False
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    data["running"] = alive and data.get("state") != "stopped"
    data["age_s"] = round(time.time() - data.get("updated", 0), 1)
    return data
