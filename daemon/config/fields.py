"""Read a schema dataclass from a ``Reader``, field by field, by the rules in its metadata.

A field's default is the dataclass default, or the same field of ``base`` (the section it
inherits from, as a pair's ``options`` inherit ``output:``). ``bool``, ``int``, ``float``,
``str``, ``Path``, ``X | None`` and nested dataclasses are read generically; anything else
(colours, ratios, lists) is parsed by its section and handed in as ``given``.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any

from daemon.config.reader import Reader

SCALARS = (bool, int, float, str)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(hint, False)``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def yaml_key(f: dataclasses.Field) -> str | None:
    """The field's key in the YAML (dotted for a key in a small sub-mapping), or None."""
    return f.metadata.get("key", f.name)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # a required field: its section checks it


def read_key(r: Reader, cls: type, name: str, base: Any = None) -> Any:
    """One field of ``cls`` from ``r``, for a section that needs it before the others."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = getattr(base, name) if base is not None else default_of(f)
    return _read(r, yaml_key(f), hints(cls)[name], default, f.metadata)


def read_section(r: Reader, cls: type, base: Any = None, *, given: dict | None = None,
                 defaults: dict | None = None) -> Any:
    """``cls`` from the mapping under ``r``; fields in ``given`` are already parsed,
    ``defaults`` replaces a field's default. Unknown keys are an error."""
    values = dict(given or {})
    subs: dict[str, Reader] = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        key = yaml_key(f)
        if key is None:
            raise TypeError(f"{cls.__name__}.{f.name} is no config key: pass it in given")
        where = r
        if "." in key:
            sub, key = key.split(".", 1)
            if sub not in subs:
                subs[sub] = r.child(sub)
            where = subs[sub]
        default = (defaults or {}).get(f.name)
        if default is None:
            default = getattr(base, f.name) if base is not None else default_of(f)
        values[f.name] = _read(where, key, hints(cls)[f.name], default, f.metadata)
    for sub in subs.values():
        sub.done()
    r.done()
    return cls(**values)


def _read(r: Reader, key: str, hint: Any, default: Any, rules: typing.Mapping) -> Any:
    kind, _ = unwrap_optional(hint)
    if dataclasses.is_dataclass(hint):
        return read_section(r.child(key), hint, default)
    if kind is Path:
        return r.path_value(key, default)
    if kind in SCALARS:
        return r.get(key, kind, default, choices=rules.get("choices"),
                     minimum=rules.get("minimum"), maximum=rules.get("maximum"))
    raise TypeError(f"no generic reader for {key}: {hint}; parse it in its section")
