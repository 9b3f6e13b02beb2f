"""Configuration: the schema (frozen dataclasses) and the YAML loader with discovery."""
from daemon.config.loader import (BUILTIN, candidates, default_cache_dir, default_models_dir,
                                  discover, is_builtin, load, load_effective, parse, replace,
                                  state_path)
from daemon.config.schema import *  # noqa: F401,F403
from daemon.config.schema import (AFTER_SUCCESS, BACKENDS, DEFAULT_IGNORE, LOG_FORMATS,  # noqa: F401
                                  OBSERVERS, POLICIES)

__all__ = ["BUILTIN", "candidates", "default_cache_dir", "default_models_dir", "discover",
           "is_builtin", "load", "load_effective", "parse", "replace", "state_path"]
