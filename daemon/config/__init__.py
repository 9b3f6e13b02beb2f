"""Configuration: the schema (frozen dataclasses) and the YAML loader with discovery."""
from daemon.config.loader import (BUILTIN, candidates, default_cache_dir, default_models_dir,
                                  discover, is_builtin, load, load_effective, parse, replace,
                                  state_path)
from daemon.config.schema import (AFTER_SUCCESS, BACKENDS, COLOURS, CROPS, DEFAULT_IGNORE,
                                  FORMAT_EXT, FORMATS, LOG_FORMATS, METADATA, OBSERVERS,
                                  POLICIES, AlphaMatting, CacheConfig, CacheLimits, Canvas,
                                  Config, ConfigError, Deliverable, MatchThresholds,
                                  OutputOptions, PruneSchedule, Secret, StoreConfig, WatchPair,
                                  WebConfig)

__all__ = [
    "AFTER_SUCCESS", "BACKENDS", "BUILTIN", "COLOURS", "CROPS", "DEFAULT_IGNORE", "FORMAT_EXT",
    "FORMATS", "LOG_FORMATS", "METADATA", "OBSERVERS", "POLICIES", "AlphaMatting", "CacheConfig",
    "CacheLimits", "Canvas", "Config", "ConfigError", "Deliverable", "MatchThresholds",
    "OutputOptions", "PruneSchedule", "Secret", "StoreConfig", "WatchPair", "WebConfig", "candidates",
    "default_cache_dir", "default_models_dir", "discover", "is_builtin", "load",
    "load_effective", "parse", "replace", "state_path",
]
