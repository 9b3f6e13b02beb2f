"""The runtime of one config: engines, cache guard, locks, pipeline, pruner, plans.

Built whole (every pair's model loaded and verified) before it is used, so a
reload either swaps in a complete new App or refuses and keeps the old one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from daemon.budget import PixelBudget
from daemon.cache.guard import CacheGuard
from daemon.cache.pruner import Pruner
from daemon.config import Config, WatchPair
from daemon.coord.locks import LockBackend
from daemon.inference.engine import Engines
from daemon import config as configmod
from daemon.ledger import Ledger, adopted_mark
from daemon.pipeline import Pipeline, Plan

log = structlog.get_logger("rembgd.service")


@dataclass
class App:
    cfg: Config
    engines: Engines
    guard: CacheGuard | None
    locks: LockBackend | None
    pipeline: Pipeline
    plans: dict[int, Plan] = field(default_factory=dict)  # pair index -> plan
    ledgers: dict[int, Ledger] = field(default_factory=dict)  # pair index -> its outbox's ledger

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
        plans = {i: Plan(p.options, p.outputs) for i, p in enumerate(cfg.watch)}
        engines.preload(sorted({plan.options.model for plan in plans.values()}))
        same_cache = previous is not None and (previous.cfg.store, previous.cfg.cache.dir,
                                               previous.cfg.cache.enabled) == (
            cfg.store, cfg.cache.dir, cfg.cache.enabled)
        if same_cache:
            guard, locks = previous.guard, previous.locks
        else:
            guard = CacheGuard(cfg.store, cfg.cache) if cfg.cache.enabled else None
            locks = guard.locks if guard is not None else None
        budget = previous.pipeline.budget if previous is not None and \
            previous.cfg.memory_budget_mp == cfg.memory_budget_mp else \
            PixelBudget(cfg.memory_budget_mp * 1e6)
        pipeline = Pipeline(engines, guard, cfg.cache, max_pixels=cfg.max_image_pixels,
                            claim_ttl_s=cfg.store.claim_ttl_s, budget=budget)
        for plan in plans.values():
            pipeline.targets(plan)  # every model file verified and keyed now
        if previous is not None:
            pipeline.inferences = previous.pipeline.inferences  # a running total
        state_dir = configmod.state_path(cfg).parent
        ledgers = {i: Ledger(p.outbox, adopted_mark=adopted_mark(state_dir, p.outbox))
                   for i, p in enumerate(cfg.watch)}
        return cls(cfg, engines, guard, locks, pipeline, plans, ledgers)

    def shares_cache_with(self, other: App) -> bool:
        return self.guard is other.guard

    def pruner_for(self, current: Pruner | None) -> Pruner | None:
        """A pruner for the store open now (kept while the store and limits are the same)."""
        store = self.guard.store if self.guard is not None else None
        if store is None:
            return None
        c = self.cfg.cache
        if current is not None and current.store is store and (current.limits, current.schedule) \
                == (c.limits, c.prune):
            return current
        return Pruner(store, c.limits, c.prune, self.locks)

    def plan(self, pair_index: int) -> Plan:
        return self.plans[pair_index]

    def pair(self, pair_index: int) -> WatchPair:
        return self.cfg.watch[pair_index]

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
