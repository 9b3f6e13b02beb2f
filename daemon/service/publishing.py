"""What a running daemon shows of itself: the status file and systemd's STATUS= line
every tick, the ``progress`` log line, and the readings ``/metrics`` takes at scrape."""
from __future__ import annotations

import structlog

from daemon import config as configmod
from daemon import review
from daemon.nofollow import failure_sidecars
from daemon.service import systemd
from daemon.service.status import build_status, progress_fields, queue_depth, write_status

log = structlog.get_logger("rembgd.service")


class Publisher:
    """The status of a running Supervisor ``sup``, written every tick of its main loop."""

    def __init__(self, sup):
        self.sup = sup
        self.ticks = self.idle_ticks = 0  # ticks of the main loop; the idle ones in a row
        self._last_key: str | None = None
        self._last_counts: dict = {}
        self._last_progress: float | None = None

    def publish(self, st: dict | None = None, *, changed: bool = True) -> None:
        """Write the status file; ``changed`` False: only the tick counters moved (not
        fsynced, no STATUS= line)."""
        st = build_status(self.sup) if st is None else st
        try:
            write_status(configmod.state_path(self.sup.cfg), st, durable=changed)
        except OSError:
            pass
        if changed:
            systemd.notify(f"STATUS={st['line']}")

    def tick(self, now: float) -> None:
        """One tick of the main loop (``now``: monotonic): count it, publish the status
        (durably when more than the tick counters moved), log progress at most every
        ``progress_interval_s`` when the counters moved."""
        if self._last_progress is None:
            self._last_progress = now
        st = build_status(self.sup)
        self.ticks += 1  # what tests wait on instead of sleeping: idle for n ticks
        self.idle_ticks = self.idle_ticks + 1 if st["state"] == "idle" else 0
        st.update(ticks=self.ticks, idle_ticks=self.idle_ticks)
        key = f"{st['line']}|{st['in_progress']}|{st['cache']}"
        self.publish(st, changed=key != self._last_key)
        self._last_key = key
        counts = st["counters"]
        if (counts != self._last_counts
                and now - self._last_progress >= self.sup.cfg.progress_interval_s):
            self._last_progress, self._last_counts = now, counts
            log.info("progress", **progress_fields(st))


class Readings:
    """The gauges ``daemon.service.metrics.Metrics`` reads at scrape, from ``sup``."""

    def __init__(self, sup):
        self.sup = sup

    def queue_depth(self) -> int:
        return queue_depth(self.sup)

    def review_pending(self) -> int:
        return sum(len(review.list_items(review.review_dir(p))) for p in self.sup.cfg.watch)

    def failed_files(self) -> int:
        return sum(1 for p in self.sup.cfg.watch for _ in failure_sidecars(p.failed_dir))

    def standby_pairs(self) -> dict[str, bool]:
        return {str(p.inbox): self.sup.standby.active(p.key) for p in self.sup.cfg.watch}

    def cache(self) -> dict:
        app = self.sup.app
        cache = app.cache if app is not None else None
        if cache is None:
            return {}
        state = cache.guard.status()
        return {"entries": cache.guard.call(lambda store: store.count(), default=None)
                if state["available"] else None,
                "available": state["available"], "outages": state["outages"]}
