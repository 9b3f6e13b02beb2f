"""Which config is in force: ``--config``, ``$REMBGD_CONFIG``, ``./config.yaml``,
``$XDG_CONFIG_HOME/rembgd/config.yaml``, ``/etc/rembgd/config.yaml``, else the built-in
defaults (no watch pairs: enough for ``rembgd process``, not for ``rembgd run``).
A file named by ``--config`` or ``$REMBGD_CONFIG`` must exist.
"""
from __future__ import annotations

import os
from pathlib import Path

from daemon.config.loader import load, parse
from daemon.config.schema import Config, ConfigError

BUILTIN = "built-in defaults"


def candidates(explicit: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Where a config is looked for, in order, each with how it was named."""
    if explicit is not None:
        return [(Path(explicit), "--config")]
    if os.environ.get("REMBGD_CONFIG"):
        return [(Path(os.environ["REMBGD_CONFIG"]), "$REMBGD_CONFIG")]
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return [(Path("config.yaml"), "./config.yaml"),
            (Path(xdg) / "rembgd" / "config.yaml", "$XDG_CONFIG_HOME/rembgd/config.yaml"),
            (Path("/etc/rembgd/config.yaml"), "/etc/rembgd/config.yaml")]


def discover(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use; None: the built-in defaults."""
    options = candidates(explicit)
    if explicit is not None or os.environ.get("REMBGD_CONFIG"):
        return options[0][0]
    for path, _ in options:
        if path.is_file():
            return path
    return None


def load_effective(explicit: str | os.PathLike | None = None, *,
                   check_folders: bool = True) -> Config:
    """The config found by :func:`discover`, or the built-in defaults (no watch pairs)."""
    path = discover(explicit)
    if path is not None:
        return load(path, check_folders=check_folders)
    if check_folders:
        where = ", ".join(name for _, name in candidates())
        raise ConfigError(f"{BUILTIN}: watch: no config file found (looked for {where}); "
                          "write one with at least one {inbox, outbox} pair")
    return parse({}, Path.cwd() / BUILTIN, check_folders=False)


def is_builtin(cfg: Config) -> bool:
    return cfg.source.name == BUILTIN
