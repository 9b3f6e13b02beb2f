"""Prometheus metrics (``/metrics``), on a registry of their own.

Counters and histograms are fed as files are processed; the gauges (queue
depth, standby pairs, cache entries and availability) and the count of cache
outages are read from callbacks at scrape time,
so nothing has to keep them up to date. The cache hit ratio is this daemon's
own: hits (exact, pixel, near) over files processed since it started.
"""
from __future__ import annotations

import platform
import threading
import time
from importlib import metadata
from typing import Callable, Iterator

import structlog
from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.cache.base import Tier

log = structlog.get_logger("rembgd.metrics")

disable_created_metrics()  # no *_created series: they double the exposition for nothing here

try:
    VERSION = metadata.version("rembgd")
except metadata.PackageNotFoundError:  # run from a checkout that is not installed
    VERSION = "unknown"
PROCESSING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Gauges(Collector):
    """The gauges, read through the callbacks at each scrape; a failing callback drops
    its gauge from that scrape (logged) instead of failing the scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def _read(self, name: str, fn: Callable | None):
        if fn is None:
            return None
        try:
            return fn()
        except Exception as exc:  # a scrape must never take the daemon's errors along
            log.warning("metrics_callback_failed", gauge=name, error=f"{type(exc).__name__}: {exc}")
            return None

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        depth = self._read("queue_depth", m.queue_depth)
        if depth is not None:
            yield GaugeMetricFamily("rembgd_queue_depth", "Files waiting to be processed (not "
                                    "counting incomplete files: rembgd_files_incomplete)",
                                    value=depth)
        incomplete = self._read("files_incomplete", m.incomplete)
        if incomplete is not None:
            yield GaugeMetricFamily("rembgd_files_incomplete",
                                    "Files in an inbox found empty or truncated, waiting to "
                                    "complete (they go to failed/ after incomplete_timeout_s)",
                                    value=incomplete)
        standby = self._read("pair_standby", m.standby)
        if standby is not None:
            g = GaugeMetricFamily("rembgd_pair_standby",
                                  "1 while a watch pair is on standby (its folders are "
                                  "unavailable), else 0", labels=["pair"])
            for pair, on in sorted(standby.items()):
                g.add_metric([str(pair)], 1.0 if on else 0.0)
            yield g
        cache = self._read("cache", m.cache) or {}
        if cache.get("entries") is not None:
            yield GaugeMetricFamily("rembgd_cache_entries", "Entries in the mask cache",
                                    value=cache["entries"])
        if cache.get("available") is not None:
            yield GaugeMetricFamily("rembgd_cache_available",
                                    "1 while the mask cache works, 0 during an outage "
                                    "(files are processed without it)",
                                    value=1.0 if cache["available"] else 0.0)
        if cache.get("outages") is not None:
            yield CounterMetricFamily("rembgd_cache_outages",
                                      "Cache outages since the daemon started",
                                      value=cache["outages"])
        for name, fn, doc in (
                ("rembgd_review_pending", m.review_pending,
                 "Cutouts waiting for review now (all pairs)"),
                ("rembgd_failed_files", m.failed_files,
                 "Files in failed/ now, with a sidecar (all pairs; dismissed ones not counted)")):
            value = self._read(name, fn)
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        with m._lock:
            last = m._last_processed
        if last is not None:
            yield GaugeMetricFamily("rembgd_last_processed_timestamp_seconds",
                                    "Unix time the last file was processed (any tier)",
                                    value=last)
        info = GaugeMetricFamily("rembgd_build_info", "The running rembgd's version (always 1)",
                                 labels=["version", "python"])
        info.add_metric([VERSION, platform.python_version()], 1.0)
        yield info
        ratio = m.hit_ratio()
        if ratio is not None:
            yield GaugeMetricFamily("rembgd_cache_hit_ratio",
                                    "Cache hits (exact, pixel, near) over files processed "
                                    "since the daemon started", value=ratio)


class Metrics:
    """The daemon's metrics. ``queue_depth() -> int``, ``incomplete() -> int``,
    ``standby() -> {pair: bool}`` and ``cache() -> {"entries": int | None, "available":
    bool, "outages": int}`` (empty: no cache) are called at scrape time; any may be None."""

    def __init__(self, *, queue_depth: Callable[[], int] | None = None,
                 standby: Callable[[], dict[str, bool]] | None = None,
                 cache: Callable[[], dict] | None = None,
                 incomplete: Callable[[], int] | None = None,
                 review_pending: Callable[[], int] | None = None,
                 failed_files: Callable[[], int] | None = None) -> None:
        self.queue_depth, self.standby, self.cache = queue_depth, standby, cache
        self.incomplete = incomplete
        self.review_pending, self.failed_files = review_pending, failed_files
        self._last_processed: float | None = None
        self.registry = CollectorRegistry()
        self._files = Counter("rembgd_files_processed", "Files processed, by pair and tier "
                              "(exact, pixel, near, miss)", ["pair", "tier"],
                              registry=self.registry)
        self._failed = Counter("rembgd_files_failed", "Files moved to failed/, by pair and "
                               "reason", ["pair", "reason"], registry=self.registry)
        self._reviewed = Counter("rembgd_files_reviewed", "Cutouts routed to review (mask "
                                 "confidence below the pair's min_confidence)", ["pair"],
                                 registry=self.registry)
        self._seconds = Histogram("rembgd_processing_seconds", "Seconds to process one file, "
                                  "by tier", ["tier"], buckets=PROCESSING_BUCKETS,
                                  registry=self.registry)
        self._inference = Histogram("rembgd_inference_seconds", "Seconds per mask inference",
                                    buckets=INFERENCE_BUCKETS, registry=self.registry)
        self._lock = threading.Lock()
        self._hits = self._total = 0
        self.registry.register(_Gauges(self))

    def processed(self, pair: str, tier: str, seconds: float) -> None:
        self._files.labels(pair=pair, tier=tier).inc()
        self._seconds.labels(tier=tier).observe(seconds)
        with self._lock:
            self._total += 1
            self._hits += Tier(tier).is_hit
            self._last_processed = time.time()

    def failed(self, pair: str, reason: str) -> None:
        self._failed.labels(pair=pair, reason=reason).inc()

    def reviewed(self, pair: str) -> None:
        self._reviewed.labels(pair=pair).inc()

    def inference(self, seconds: float) -> None:
        self._inference.observe(seconds)

    def hit_ratio(self) -> float | None:
        with self._lock:
            return self._hits / self._total if self._total else None

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
