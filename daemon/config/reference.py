"""The configuration reference (docs/configuration.md), generated from the schema.

Every key of every section with its type, default and meaning, read from the fields'
``setting()`` metadata, so the docs cannot drift from the loader. ``rembgd config
reference`` prints it; tests/test_config_reference.py checks the committed file.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

from daemon.config.fields import default_of, hints, unwrap_optional, yaml_key
from daemon.config.schema import Config

INTRO = """\
# Configuration reference

<!-- Generated from daemon/config/schema.py by `rembgd config reference` (`make docs`).
     Do not edit: tests/test_config_reference.py fails when this file differs. -->

rembgd reads one YAML file, the first found of: `--config FILE`, `$REMBGD_CONFIG`,
`./config.yaml`, `$XDG_CONFIG_HOME/rembgd/config.yaml`, `/etc/rembgd/config.yaml`; with
none, the built-in defaults below (no watch pairs: enough for `rembgd process`, not for
`rembgd run`). `rembgd config show` prints the effective config and where it came from.
The annotated example is [`config.yaml`](../config.yaml).

Relative paths resolve against the config file's folder; `~` expands. Every key is
checked at start and on reload: an unknown key, a wrong type or a value out of range is
one error line naming the file and the key, e.g.
`config.yaml: cache.limits.policy: must be one of lru, lfu, lfu-decay, got 'fifo'`.
An int is accepted where a number is expected.
"""


def markdown() -> str:
    return INTRO + "".join(_section("top level", Config))


def _section(title: str, cls: type) -> list[str]:
    """The table of ``cls`` under ``title``, then its nested sections, depth first."""
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key, rules, hint = yaml_key(f), f.metadata, hints(cls)[f.name]
        if key is None:
            continue
        inner = _nested(hint) if "type_doc" not in rules else None
        meaning = rules.get("doc", "")
        if inner is None:
            default = _default(f)
        else:  # a section of its own, after this table
            path = key if cls is Config else f"{title}.{key}"
            path += "[]" if typing.get_origin(hint) is tuple else ""
            nested += _section(path, inner)
            see = f"see [{path}](#{path.replace('.', '').replace('[]', '')})"
            meaning = f"{meaning}; {see}" if meaning else see
            default = rules.get("default_doc", "")
        rows.append(f"| `{key}` | {_cell(_type(hint, rules))} | {_cell(default)} "
                    f"| {_cell(meaning)} |\n")
    return [f"\n## {title}\n\n{_paragraph(cls.__doc__)}\n\n"
            "| key | type | default | meaning |\n|---|---|---|---|\n", *rows, *nested]


def _nested(hint: Any) -> type | None:
    """The dataclass a field holds (alone, in ``X | None`` or in a tuple), or None."""
    kind, _ = unwrap_optional(hint)
    if typing.get_origin(kind) is tuple:
        kind = typing.get_args(kind)[0]
    return kind if dataclasses.is_dataclass(kind) else None


def _type(hint: Any, rules: typing.Mapping) -> str:
    if "type_doc" in rules:
        return rules["type_doc"]
    kind, nullable = unwrap_optional(hint)
    if "choices" in rules:
        text = " | ".join(f"`{c}`" for c in rules["choices"])
    elif typing.get_origin(kind) is tuple:
        text = "list"
    elif dataclasses.is_dataclass(kind):
        text = "mapping"
    else:
        text = {bool: "bool", int: "int", float: "number", str: "string", Path: "path"}[kind]
    low, high = rules.get("minimum"), rules.get("maximum")
    if low is not None and high is not None:
        text += f", {low} to {high}"
    elif low is not None or high is not None:
        text += f", >= {low}" if low is not None else f", <= {high}"
    return text + (" or null" if nullable else "")


def _default(f: dataclasses.Field) -> str:
    if "default_doc" in f.metadata:
        return f.metadata["default_doc"]
    return f"`{_yaml(default_of(f))}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str) and not value[:1].isalnum():
        return f'"{value}"'
    return str(value)


def _paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split()).replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
