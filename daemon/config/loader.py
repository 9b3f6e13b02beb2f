"""The YAML loader: read config.yaml, validate it strictly, resolve paths.

Every error names the offending key and the file, e.g.
``config.yaml: watch[0].outbox: must not be inside inbox /srv/in``.
Relative paths are resolved against the directory of the config file.

Adding a key: declare a field with ``setting(default, "meaning", minimum=..., choices=...)``
on its dataclass in schema.py; a bool, int, float, str, Path, ``X | None`` or nested
dataclass is read by its rules with no change here. A key of another type (a colour, a
list) gets a few lines in its section's parser below, handed to ``read_section`` in
``given``. Adding a section: a dataclass, and a field of that type where it nests
(``web: Web = setting(factory=Web)`` on Config). Then run ``make docs``: the reference
test fails until docs/configuration.md is regenerated.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from daemon.config.fields import read_key, read_section
from daemon.config.folders import check_folders as check_pair_folders
from daemon.config.outputs import NAME_RE, check_unused_options, parse_outputs
from daemon.config.reader import Reader
from daemon.config.schema import (DEFAULT_IGNORE, LOCAL_HOSTS, CacheConfig, Config, ConfigError,
                                  Deliverable, OutputOptions, PruneSchedule, ReviewConfig, Secret,
                                  WatchPair, WebConfig, split_listen, token_problem)


def parse(data: Any, source: Path, *, check_folders: bool = True) -> Config:
    """Build a validated Config from already-loaded YAML data."""
    source = Path(source).resolve()
    r = Reader(source, data, "")
    output = _output_options(r.child("output"), OutputOptions())
    cache = _cache(r.child("cache"))
    outputs = parse_outputs(r, "outputs", ())
    if outputs:  # `rembgd process` renders `output:` with them
        check_unused_options(source, "outputs", output, _set_at(None, "output"))
    cfg = read_section(r, Config, given={
        "source": source, "output": output, "cache": cache, "outputs": outputs,
        "watch": _watch(r, output, outputs), "umask": _umask(r), "ignore": _ignore(r),
        "web": _web(r)})
    if check_folders:
        check_pair_folders(source, cfg.watch, cfg.cache.dir)
    return cfg


def load(path: str | os.PathLike, *, check_folders: bool = True) -> Config:
    """Read and validate a config file; raises ConfigError with file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {' '.join(str(what).split())}") from exc
    return parse(data, path, check_folders=check_folders)


# ------------------------------------------------------------------ one parser per section


def _output_options(r: Reader, base: OutputOptions) -> OutputOptions:
    """``output:``, or a pair's ``options:`` on top of it (``base``)."""
    bgcolor = r.get("bgcolor", list, None)
    if bgcolor is not None:
        if len(bgcolor) != 4 or not all(isinstance(c, int) and 0 <= c <= 255 for c in bgcolor):
            r.fail("must be a list of four integers 0-255 [r, g, b, a]", "bgcolor")
        bgcolor = tuple(bgcolor)
    return read_section(r, OutputOptions, base, given={"bgcolor": bgcolor or base.bgcolor})


def _cache(r: Reader) -> CacheConfig:
    return read_section(r, CacheConfig, given={"prune": _prune(r.child("prune"))})


def _prune(r: Reader) -> PruneSchedule:
    daily = r.get("daily_at", (str, int), None)
    if isinstance(daily, int) and 0 <= daily < 24 * 60:
        daily = f"{daily // 60:02d}:{daily % 60:02d}"  # YAML 1.1 reads unquoted 03:30 as 210
    if daily is not None:
        daily = str(daily)
        parts = daily.split(":")
        if not (len(parts) == 2 and all(p.isdigit() and len(p) == 2 for p in parts)
                and int(parts[0]) < 24 and int(parts[1]) < 60):
            r.fail(f"must be HH:MM (24-hour, local time), got {daily!r}", "daily_at")
    return read_section(r, PruneSchedule, given={"daily_at": daily})


def _watch(r: Reader, output: OutputOptions,
           outputs: tuple[Deliverable, ...]) -> tuple[WatchPair, ...]:
    raw = r.raw("watch")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail("must be a list of {inbox, outbox} pairs", "watch")
    pairs = tuple(_pair(Reader(r.source, item, f"watch[{i}]"), output, outputs)
                  for i, item in enumerate(raw))
    named: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if pair.name is None:
            continue
        if pair.name in named:
            Reader(r.source, raw[i], f"watch[{i}]").fail(
                f"{pair.name!r} is also the name of watch[{named[pair.name]}]; "
                "pair names must be unique", "name")
        named[pair.name] = i
    return pairs


def _pair(w: Reader, output: OutputOptions, outputs: tuple[Deliverable, ...]) -> WatchPair:
    inbox, outbox = read_key(w, WatchPair, "inbox"), read_key(w, WatchPair, "outbox")
    if inbox is None:
        w.fail("is required", "inbox")
    if outbox is None:
        w.fail("is required", "outbox")
    opts = w.child("options")
    options = _output_options(opts, output)
    review = read_section(w.child("review"), ReviewConfig) \
        if w.raw("review") is not None else None
    pair = read_section(w, WatchPair, given={
        "inbox": inbox, "outbox": outbox, "options": options,
        "outputs": parse_outputs(w, "outputs", outputs), "review": review},
        defaults={"failed_dir": outbox.parent / "failed", "done_dir": inbox.parent / "done"})
    if pair.name is not None and (not NAME_RE.match(pair.name) or pair.name.endswith(".")):
        w.fail("must be 1-64 letters, digits, '.', '_' or '-', not starting or ending "
               f"with '.', got {pair.name!r}", "name")
    if pair.outputs:
        own = w.data.get("outputs") is not None
        check_unused_options(w.source, f"{w.path}.outputs" if own else "outputs", options,
                             _set_at(opts, "output"))
    return pair


def _set_at(opts: Reader | None, fallback: str) -> dict[str, str]:
    """Where each option that deliverables ignore was set: the pair's ``options`` when
    it names the option, else the ``output:`` section it was inherited from."""
    own = opts.data if opts is not None else {}
    matting = own.get("alpha_matting") or {}
    named = {"only_mask": own.get("only_mask") is not None,
             "bgcolor": own.get("bgcolor") is not None,
             "alpha_matting": matting.get("enabled") is not None}
    return {option: f"{opts.path if here else fallback}.{option}"
            + (".enabled" if option == "alpha_matting" else "")
            for option, here in named.items()}


def _web(r: Reader) -> WebConfig | None:
    """``web:`` (an empty section: the defaults); absent: None, no server. Off localhost
    the token is required."""
    if "web" not in r.data:
        return None
    w = r.child("web")
    listen = read_key(w, WebConfig, "listen")
    if split_listen(listen) is None:
        w.fail(f"must be HOST:PORT such as 127.0.0.1:8765 or [::1]:8765, got {listen!r}",
               "listen")
    token = w.get("token", str, None)
    problem = token_problem(token) if token is not None else None
    if problem is not None:
        w.fail(problem, "token")
    web = read_section(w, WebConfig, given={"listen": listen,
                                            "token": Secret(token) if token else None})
    if not web.local and web.token is None:
        w.fail(f"is required when web.listen is {listen} (not {' or '.join(LOCAL_HOSTS)}): "
               "every request must then carry it", "token")
    return web


def _umask(r: Reader) -> int:
    raw = r.get("umask", (int, str), Config.umask)
    try:
        umask = int(raw, 8) if isinstance(raw, str) else int(raw)
        if not 0 <= umask <= 0o777:
            raise ValueError
    except ValueError:
        r.fail(f"must be an octal mode like '022', got {raw!r}", "umask")
    return umask


def _ignore(r: Reader) -> tuple[str, ...]:
    ignore = r.get("ignore", list, list(DEFAULT_IGNORE))
    if not all(isinstance(p, str) for p in ignore):
        r.fail("must be a list of glob patterns", "ignore")
    return tuple(ignore)
