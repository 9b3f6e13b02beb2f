"""docs/configuration.md is generated from the schema and cannot drift from the loader."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from daemon.config import Config, reference
from daemon.config.fields import hints, yaml_key

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def documented_keys(text: str) -> set[str]:
    """Every key path the reference documents: ``cache.match.phash_radius``..."""
    keys, section = set(), ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = "" if line == "## top level" else line[3:].replace("[]", "") + "."
        elif m := re.match(r"\| `([^`]+)` \|", line):
            keys.add(section + m.group(1))
    return keys


def yaml_keys(node, prefix: str = "") -> set[str]:
    """Every key path written in a config that holds a value (list items under their
    list's key)."""
    if isinstance(node, list):
        return set().union(*(yaml_keys(item, prefix) for item in node))
    if not isinstance(node, dict):
        return set()
    found = set()
    for key, value in node.items():
        path = prefix + key
        if not isinstance(value, dict):
            found.add(path)
        if key not in ("options", "outputs") or not prefix:  # a pair's: documented as such
            found |= yaml_keys(value, path + ".")
    return found


def test_committed_reference_is_what_the_generator_writes():
    assert DOC.read_text(encoding="utf-8") == reference.markdown(), (
        "docs/configuration.md is out of date with daemon/config/schema.py: run `make docs` "
        "(or `rembgd config reference > docs/configuration.md`) and commit it")


def test_cli_prints_the_reference_without_reading_a_config(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("workers: [\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "--config", broken, "config",
                           "reference"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference.markdown()


def test_every_key_has_a_meaning():
    """A key without a doc line would be a blank in the reference (sections need none)."""
    missing, todo, seen = [], [Config], set()
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            hint = hints(cls)[f.name]
            inner = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
            todo += [a for a in inner if a not in seen]
            seen.update(inner)
            section = inner and "type_doc" not in f.metadata
            if yaml_key(f) is not None and not section and not f.metadata.get("doc"):
                missing.append(f"{cls.__name__}.{f.name}")
    assert len(seen) >= 10, seen
    assert not missing, f"give these fields a doc in setting(...): {missing}"


def test_every_key_of_the_shipped_configs_is_documented():
    """config.yaml (its commented `outputs:` example included) and the NAS example."""
    lines, inside = [], False
    for line in (ROOT / "config.yaml").read_text().splitlines():
        inside = line.startswith("# outputs:") or inside and line.startswith("#   ")
        lines.append(line[2:] if inside else line)
    written = yaml_keys(yaml.safe_load("\n".join(lines)))
    written |= yaml_keys(yaml.safe_load((ROOT / "systemd" / "config.nas.yaml").read_text()))
    assert "outputs.canvas.fill" in written and "cache.match.phash_radius" in written
    documented = documented_keys(DOC.read_text(encoding="utf-8"))
    assert written - documented == set()
    assert {"models.dir", "logging.format", "watch.inbox", "output.alpha_matting.enabled",
            "outputs.canvas.aspect", "cache.prune.daily_at"} <= documented
