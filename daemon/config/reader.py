"""The strict YAML walker the loader is built on: typed values, known keys, key paths.

A ``Reader`` wraps one mapping of the config at a dotted key path
(``watch[0].outputs[1].canvas``); every value it hands out is type-checked,
every error is a one-line ``ConfigError`` ``<file>: <key path>: <what is wrong>``,
and ``done()`` rejects the keys nobody asked for (with a "did you mean").
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from daemon.config.schema import ConfigError


class Reader:
    """Walks a YAML mapping, type-checks values and rejects unknown keys."""

    def __init__(self, source: Path, data: Any, path: str):
        self.source, self.path = source, path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(f"must be a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.seen: set[str] = set()

    def where(self, key: str | None = None) -> str:
        """The dotted key path of ``key`` under this mapping (or of the mapping itself)."""
        if key is None:
            return self.path or "<top>"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, message: str, key: str | None = None) -> None:
        raise ConfigError(f"{self.source}: {self.where(key)}: {message}")

    def child(self, key: str) -> Reader:
        self.seen.add(key)
        return Reader(self.source, self.data.get(key), self.where(key))

    def raw(self, key: str) -> Any:
        """The value as YAML gave it (None when absent); marks the key as known."""
        self.seen.add(key)
        return self.data.get(key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, *, choices=None,
            minimum: float | None = None, maximum: float | None = None) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None and default is None:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(f"expected {names}, got {type(value).__name__} {value!r}", key)
        if choices is not None and value not in choices:
            self.fail(f"must be one of {', '.join(map(str, choices))}, got {value!r}", key)
        if minimum is not None and value < minimum:
            self.fail(f"must be >= {minimum}, got {value!r}", key)
        if maximum is not None and value > maximum:
            self.fail(f"must be <= {maximum}, got {value!r}", key)
        return value

    def path_value(self, key: str, default: Path | None) -> Path | None:
        raw = self.get(key, str, None)
        if raw is None:
            return default
        return (self.source.parent / os.path.expanduser(raw)).resolve()

    def done(self) -> None:
        unknown = sorted(map(str, set(self.data) - self.seen))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
            self.fail(f"unknown key; {hint}known keys here: {', '.join(sorted(self.seen))}{more}",
                      key)
