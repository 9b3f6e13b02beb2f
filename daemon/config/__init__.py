"""Configuration: the schema (frozen dataclasses), the YAML loader and config discovery."""
from daemon.config.discovery import BUILTIN, candidates, discover, is_builtin, load_effective
from daemon.config.loader import load, parse
from daemon.config.schema import (AFTER_SUCCESS, BACKENDS, COLOURS, CROPS, DEFAULT_IGNORE,
                                  FORMAT_EXT, FORMATS, LOCAL_HOSTS, LOG_FORMATS, LOG_LEVELS,
                                  METADATA, OBSERVERS, POLICIES, AlphaMatting, CacheConfig,
                                  CacheLimits, Canvas, Config, ConfigError, Deliverable,
                                  MatchThresholds, OutputOptions, PruneSchedule, Secret,
                                  StoreConfig, WatchPair, WebConfig, default_cache_dir,
                                  default_models_dir, replace, state_path)

__all__ = [
    "AFTER_SUCCESS", "BACKENDS", "BUILTIN", "COLOURS", "CROPS", "DEFAULT_IGNORE", "FORMAT_EXT",
    "FORMATS", "LOCAL_HOSTS", "LOG_FORMATS", "LOG_LEVELS", "METADATA", "OBSERVERS", "POLICIES",
    "AlphaMatting", "CacheConfig", "CacheLimits", "Canvas", "Config", "ConfigError",
    "Deliverable", "MatchThresholds", "OutputOptions", "PruneSchedule", "Secret", "StoreConfig",
    "WatchPair", "WebConfig", "candidates", "default_cache_dir", "default_models_dir",
    "discover", "is_builtin", "load", "load_effective", "parse", "replace", "state_path",
]
