"""The runtime of one config: engines, the cache (store, guard, locks), pipeline, pruner, plans.

``open_cache`` is the one place that decides whether the cache is on and builds
its store, guard and lock backend; ``App.build`` and ``rembgd process`` use it.

Built whole (every pair's model loaded and verified) before it is used, so a
reload either swaps in a complete new App or refuses and keeps the old one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from daemon import config as configmod
from daemon.budget import PixelBudget
from daemon.cache import open_store
from daemon.cache.guard import CacheGuard
from daemon.cache.outage import Outage
from daemon.cache.pruner import Pruner
from daemon.config import Config, WatchPair
from daemon.coord.locks import LockBackend, open_locks
from daemon.inference.engine import Engines
from daemon.ledger import Ledger, adopted_mark
from daemon.pipeline import Pipeline, Plan

if TYPE_CHECKING:
    from daemon.cache.redis_link import RedisLink

log = structlog.get_logger("rembgd.service")


@dataclass
class Cache:
    """The opened cache: its store behind the guard, and the lock backend that goes with it."""

    guard: CacheGuard
    locks: LockBackend
    link: RedisLink | None = None  # Redis: the one connection the store and locks share

    def close(self) -> None:
        self.guard.close()
        self.locks.close()
        if self.link is not None:
            self.link.close()


def open_cache(cfg: Config) -> Cache | None:
    """The one place that decides whether the cache is on (``cache.enabled``) and builds
    its store, guard and locks. Redis: the store and its locks share one connection,
    which records into the guard's ``Outage``: one outage, one fail-fast window, for all."""
    if not cfg.cache.enabled:
        return None
    outage, link = Outage(), None
    if cfg.store.backend == "redis":
        from daemon.cache.redis_link import RedisLink

        link = RedisLink(cfg.store, outage)
    guard = CacheGuard(cfg.store, cfg.cache, outage=outage,
                       opener=lambda: open_store(cfg.store, cfg.cache, link=link))
    return Cache(guard, open_locks(cfg.store, cfg.cache.dir, link=link), link)


def make_pipeline(cfg: Config, engines: Engines, cache: Cache | None,
                  budget: PixelBudget) -> Pipeline:
    return Pipeline(engines, cache.guard if cache else None, cache.locks if cache else None,
                    cfg.cache, max_pixels=cfg.max_image_pixels,
                    claim_ttl_s=cfg.store.claim_ttl_s, budget=budget)


@dataclass
class App:
    cfg: Config
    engines: Engines
    cache: Cache | None  # None: the cache is disabled
    pipeline: Pipeline
    plans: dict[str, Plan] = field(default_factory=dict)  # pair key -> plan
    ledgers: dict[str, Ledger] = field(default_factory=dict)  # pair key -> its outbox's ledger

    @classmethod
    def build(cls, cfg: Config, previous: App | None = None,
              engines: Engines | None = None) -> App:
        """Load and verify every model the config names (raises ModelError), and reuse
        the previous App's engines and cache where their settings did not change.
        ``engines``: already loaded engines to use (tests share one set)."""
        reuse = previous is not None and previous.cfg.models_dir == cfg.models_dir \
            and previous.cfg.threads == cfg.threads
        if engines is None:
            engines = previous.engines if reuse else Engines(cfg.models_dir, cfg.threads)
        plans = {p.key: Plan(p.options, p.outputs, judge=p.review is not None)
                 for p in cfg.watch}
        engines.preload(sorted({plan.options.model for plan in plans.values()}))
        same_cache = previous is not None and (previous.cfg.store, previous.cfg.cache.dir,
                                               previous.cfg.cache.enabled) == (
            cfg.store, cfg.cache.dir, cfg.cache.enabled)
        cache = previous.cache if same_cache else open_cache(cfg)
        budget = previous.pipeline.budget if previous is not None and \
            previous.cfg.memory_budget_mp == cfg.memory_budget_mp else \
            PixelBudget(cfg.memory_budget_mp * 1e6)
        pipeline = make_pipeline(cfg, engines, cache, budget)
        for plan in plans.values():
            pipeline.targets(plan)  # every model file verified and keyed now
        if previous is not None:
            pipeline.inferences = previous.pipeline.inferences  # a running total
        state_dir = configmod.state_path(cfg).parent
        ledgers = {p.key: Ledger(p.outbox, adopted_mark=adopted_mark(state_dir, p.outbox))
                   for p in cfg.watch}
        return cls(cfg, engines, cache, pipeline, plans, ledgers)

    @property
    def locks(self) -> LockBackend | None:
        return self.cache.locks if self.cache is not None else None

    def shares_cache_with(self, other: App) -> bool:
        return self.cache is other.cache

    def pruner_for(self, current: Pruner | None) -> Pruner | None:
        """A pruner for the store open now (kept while the store and limits are the same);
        the caller runs it through ``cache.guard.call``."""
        store = self.cache.guard.store if self.cache is not None else None
        if store is None:
            return None
        c = self.cfg.cache
        if current is not None and current.store is store and (current.limits, current.schedule) \
                == (c.limits, c.prune):
            return current
        return Pruner(store, c.limits, c.prune, self.cache.locks)

    def plan(self, key: str) -> Plan:
        return self.plans[key]

    def pair(self, key: str) -> WatchPair | None:
        """The pair whose ``WatchPair.key`` is ``key``; None: no such pair (a reload
        removed it)."""
        return next((p for p in self.cfg.watch if p.key == key), None)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
