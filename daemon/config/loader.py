"""The YAML loader: read config.yaml, validate it strictly, resolve paths.

Every error names the offending key and the file, e.g.
``config.yaml: watch[0].outbox: must not be inside inbox /srv/in``.
Relative paths are resolved against the directory of the config file.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from daemon.config.outputs import check_unused_options, parse_outputs
from daemon.config.reader import Reader
from daemon.config.schema import (AFTER_SUCCESS, BACKENDS, COLOURS, DEFAULT_IGNORE, LOG_FORMATS,
                                  METADATA, OBSERVERS, POLICIES, AlphaMatting, CacheConfig,
                                  CacheLimits, Config, ConfigError, Deliverable, MatchThresholds,
                                  OutputOptions, PruneSchedule, StoreConfig, WatchPair)
from daemon.config.schema import LOCAL_HOSTS, Secret, WebConfig

def _parse_options(r: Reader, base: OutputOptions) -> OutputOptions:
    am = r.child("alpha_matting")
    matting = AlphaMatting(
        enabled=am.get("enabled", bool, base.alpha_matting.enabled),
        foreground_threshold=am.get("foreground_threshold", int,
                                    base.alpha_matting.foreground_threshold, minimum=0, maximum=255),
        background_threshold=am.get("background_threshold", int,
                                    base.alpha_matting.background_threshold, minimum=0, maximum=255),
        erode_size=am.get("erode_size", int, base.alpha_matting.erode_size, minimum=0, maximum=100),
    )
    am.done()
    bgcolor = r.get("bgcolor", list, None)
    if bgcolor is not None:
        if len(bgcolor) != 4 or not all(isinstance(c, int) and 0 <= c <= 255 for c in bgcolor):
            r.fail("must be a list of four integers 0-255 [r, g, b, a]", "bgcolor")
        bgcolor = tuple(bgcolor)
    else:
        bgcolor = base.bgcolor
    return OutputOptions(
        model=r.get("model", str, base.model),
        only_mask=r.get("only_mask", bool, base.only_mask),
        post_process_mask=r.get("post_process_mask", bool, base.post_process_mask),
        alpha_matting=matting,
        bgcolor=bgcolor,
        png_compression=r.get("png_compression", int, base.png_compression, minimum=0, maximum=9),
        colour=r.get("colour", str, base.colour, choices=COLOURS),
        metadata=r.get("metadata", str, base.metadata, choices=METADATA),
    )


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


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _parse_watch(r: Reader, defaults: OutputOptions,
                 default_outputs: tuple[Deliverable, ...]) -> tuple[WatchPair, ...]:
    r.seen.add("watch")
    raw = r.data.get("watch")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail("must be a list of {inbox, outbox} pairs", "watch")
    pairs = []
    for i, item in enumerate(raw):
        w = Reader(r.source, item, f"watch[{i}]")
        inbox = w.path_value("inbox", None)
        outbox = w.path_value("outbox", None)
        if inbox is None:
            w.fail("is required", "inbox")
        if outbox is None:
            w.fail("is required", "outbox")
        after = w.get("after_success", str, "keep", choices=AFTER_SUCCESS)
        opts = w.child("options")
        options = _parse_options(opts, defaults)
        opts.done()
        pair = WatchPair(
            inbox=inbox,
            outbox=outbox,
            failed_dir=w.path_value("failed_dir", outbox.parent / "failed"),
            done_dir=w.path_value("done_dir", inbox.parent / "done"),
            recursive=w.get("recursive", bool, True),
            after_success=after,
            options=options,
            outputs=parse_outputs(w, "outputs", default_outputs),
        )
        w.done()
        if pair.outputs:
            own = "outputs" in w.data and w.data["outputs"] is not None
            check_unused_options(r.source, f"watch[{i}].outputs" if own else "outputs", options,
                                 _set_at(opts, "output"))
        pairs.append(pair)
    return tuple(pairs)


def _parse_web(r: Reader) -> WebConfig | None:
    """``web: {listen: HOST:PORT, token: ...}``; absent: None (no server). Off localhost
    the token is required, and every request must then carry it."""
    if "web" not in r.data:
        r.seen.add("web")
        return None
    w = r.child("web")
    d = WebConfig()
    listen = w.get("listen", str, f"{d.host}:{d.port}")
    token = w.get("token", str, None)
    w.done()
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        w.fail(f"must be HOST:PORT such as 127.0.0.1:8765 or [::1]:8765, got {listen!r}",
               "listen")
    if token is not None and len(token) < 16:
        w.fail("must be at least 16 characters (e.g. the output of `openssl rand -hex 16`)",
               "token")
    web = WebConfig(host, int(port), Secret(token) if token else None)
    if not web.local and web.token is None:
        w.fail(f"is required when web.listen is {listen} (not {' or '.join(LOCAL_HOSTS)}): "
               "every request must then carry it", "token")
    return web


def _check_folders(source: Path, pairs: tuple[WatchPair, ...], cache_dir: Path) -> None:
    def fail(i: int, key: str, msg: str) -> None:
        raise ConfigError(f"{source}: watch[{i}].{key}: {msg}")

    if not pairs:
        raise ConfigError(f"{source}: watch: at least one {{inbox, outbox}} pair is required")
    for i, p in enumerate(pairs):
        if not p.inbox.exists():
            fail(i, "inbox", f"folder {p.inbox} does not exist")
        if not p.inbox.is_dir():
            fail(i, "inbox", f"{p.inbox} is not a folder")
        named = {"outbox": p.outbox, "failed_dir": p.failed_dir, "done_dir": p.done_dir}
        for key, folder in named.items():
            if _is_within(folder, p.inbox):
                fail(i, key, f"{folder} must not be inside inbox {p.inbox}")
            if _is_within(p.inbox, folder):
                fail(i, key, f"{folder} must not contain inbox {p.inbox}")
        if _is_within(cache_dir, p.inbox):
            fail(i, "inbox", f"cache.dir {cache_dir} must not be inside it")
        for a, b in (("outbox", "failed_dir"), ("outbox", "done_dir"), ("failed_dir", "done_dir")):
            if _is_within(named[a], named[b]) or _is_within(named[b], named[a]):
                fail(i, b, f"{named[b]} overlaps {a} {named[a]}")
        for j, q in enumerate(pairs[:i]):
            if _is_within(p.inbox, q.inbox) or _is_within(q.inbox, p.inbox):
                fail(i, "inbox", f"{p.inbox} overlaps watch[{j}].inbox {q.inbox}")
            if p.outbox == q.outbox:
                fail(i, "outbox", f"{p.outbox} is also watch[{j}].outbox")
    for i, p in enumerate(pairs):  # nothing a pair writes may land in another pair's inbox
        for j, q in enumerate(pairs):
            if j == i:
                continue
            for key in ("outbox", "failed_dir", "done_dir"):
                folder = getattr(p, key)
                if _is_within(folder, q.inbox) or _is_within(q.inbox, folder):
                    fail(i, key, f"{folder} overlaps watch[{j}].inbox {q.inbox}")


def parse(data: Any, source: Path, *, check_folders: bool = True) -> Config:
    """Build a validated Config from already-loaded YAML data."""
    source = Path(source).resolve()
    r = Reader(source, data, "")
    out_r = r.child("output")
    defaults = _parse_options(out_r, OutputOptions())
    out_r.done()

    cache_r = r.child("cache")
    match_r = cache_r.child("match")
    d = MatchThresholds()
    match = MatchThresholds(
        phash_radius=match_r.get("phash_radius", int, d.phash_radius, minimum=0, maximum=15),
        min_cosine=match_r.get("min_cosine", float, d.min_cosine, minimum=-1, maximum=1),
        max_aspect_delta=match_r.get("max_aspect_delta", float, d.max_aspect_delta, minimum=0),
        min_edge_corr=match_r.get("min_edge_corr", float, d.min_edge_corr, minimum=-1, maximum=1),
        max_luma_delta=match_r.get("max_luma_delta", float, d.max_luma_delta, minimum=0),
        max_colour_delta=match_r.get("max_colour_delta", float, d.max_colour_delta, minimum=0),
    )
    match_r.done()
    lim_r = cache_r.child("limits")
    dl = CacheLimits()
    limits = CacheLimits(
        max_bytes=lim_r.get("max_bytes", int, dl.max_bytes, minimum=0),
        max_entries=lim_r.get("max_entries", int, dl.max_entries, minimum=0),
        ttl_days=lim_r.get("ttl_days", float, dl.ttl_days, minimum=0),
        policy=lim_r.get("policy", str, dl.policy, choices=POLICIES),
        low_water=lim_r.get("low_water", float, dl.low_water, minimum=0.5, maximum=1),
    )
    lim_r.done()
    prune_r = cache_r.child("prune")
    daily = prune_r.get("daily_at", (str, int), None)
    if isinstance(daily, int) and 0 <= daily < 24 * 60:
        daily = f"{daily // 60:02d}:{daily % 60:02d}"  # YAML 1.1 reads unquoted 03:30 as 210
    if daily is not None:
        daily = str(daily)
        parts = daily.split(":")
        if not (len(parts) == 2 and all(p.isdigit() and len(p) == 2 for p in parts)
                and int(parts[0]) < 24 and int(parts[1]) < 60):
            prune_r.fail(f"must be HH:MM (24-hour, local time), got {daily!r}", "daily_at")
    dp = PruneSchedule()
    prune = PruneSchedule(
        interval_s=prune_r.get("interval_s", float, dp.interval_s, minimum=0),
        daily_at=daily,
        limit_check_s=prune_r.get("limit_check_s", float, dp.limit_check_s, minimum=1),
    )
    prune_r.done()
    cache = CacheConfig(
        dir=cache_r.path_value("dir", default_cache_dir()),
        enabled=cache_r.get("enabled", bool, True),
        store_outputs=cache_r.get("store_outputs", bool, True),
        match=match,
        limits=limits,
        prune=prune,
    )
    cache_r.done()

    store_r = r.child("store")
    ds = StoreConfig()
    store = StoreConfig(
        backend=store_r.get("backend", str, ds.backend, choices=BACKENDS),
        url=store_r.get("url", str, ds.url),
        prefix=store_r.get("prefix", str, ds.prefix),
        local_lru_entries=store_r.get("local_lru_entries", int, ds.local_lru_entries, minimum=0),
        claim_ttl_s=store_r.get("claim_ttl_s", float, ds.claim_ttl_s, minimum=1),
        socket_timeout_s=store_r.get("socket_timeout_s", float, ds.socket_timeout_s, minimum=0.05),
        retry_s=store_r.get("retry_s", float, ds.retry_s, minimum=0.1),
    )
    store_r.done()

    models_r = r.child("models")
    models_dir = models_r.path_value("dir", default_models_dir())
    models_r.done()
    log_r = r.child("logging")
    log_level = log_r.get("level", str, "info", choices=("debug", "info", "warning", "error"))
    log_format = log_r.get("format", str, "auto", choices=LOG_FORMATS)
    log_r.done()

    outputs = parse_outputs(r, "outputs", ())
    if outputs:  # `rembgd process` renders `output:` with them
        check_unused_options(source, "outputs", defaults, _set_at(None, "output"))
    pairs = _parse_watch(r, defaults, outputs)
    umask_raw = r.get("umask", (int, str), 0o022)
    try:
        umask = int(umask_raw, 8) if isinstance(umask_raw, str) else int(umask_raw)
        if not 0 <= umask <= 0o777:
            raise ValueError
    except ValueError:
        r.fail(f"must be an octal mode like '022', got {umask_raw!r}", "umask")
    ignore = r.get("ignore", list, list(DEFAULT_IGNORE))
    if not all(isinstance(p, str) for p in ignore):
        r.fail("must be a list of glob patterns", "ignore")
    cfg = Config(
        source=source,
        watch=pairs,
        cache=cache,
        store=store,
        models_dir=models_dir,
        observer=r.get("observer", str, "auto", choices=OBSERVERS),
        poll_interval_s=r.get("poll_interval_s", float, 2.0, minimum=0.05),
        settle_s=r.get("settle_s", float, 1.0, minimum=0),
        rescan_interval_s=r.get("rescan_interval_s", float, 300.0, minimum=0),
        progress_interval_s=r.get("progress_interval_s", float, 10.0, minimum=0.1),
        ignore=tuple(ignore),
        workers=r.get("workers", int, 2, minimum=1, maximum=64),
        queue_size=r.get("queue_size", int, 256, minimum=1),
        threads=r.get("threads", int, 0, minimum=0, maximum=256),
        max_image_pixels=r.get("max_image_pixels", int, 100_000_000, minimum=1),
        memory_budget_mp=r.get("memory_budget_mp", float, 120.0, minimum=1),
        umask=umask,
        retry_attempts=r.get("retry_attempts", int, 5, minimum=0),
        retry_backoff_s=r.get("retry_backoff_s", float, 1.0, minimum=0),
        incomplete_timeout_s=r.get("incomplete_timeout_s", float, 900.0, minimum=0),
        log_level=log_level,
        log_format=log_format,
        state_file=r.path_value("state_file", None),
        output=defaults,
        outputs=outputs,
        web=_parse_web(r),
    )
    r.done()
    if check_folders:
        _check_folders(source, pairs, cache.dir)
    return cfg


def default_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "rembgd" / "models"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "rembgd"


BUILTIN = "built-in defaults"


def candidates(explicit: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Where a config is looked for, in order, each with how it was named."""
    if explicit is not None:
        return [(Path(explicit), "--config")]
    found: list[tuple[Path, str]] = []
    if os.environ.get("REMBGD_CONFIG"):
        return [(Path(os.environ["REMBGD_CONFIG"]), "$REMBGD_CONFIG")]
    found.append((Path("config.yaml"), "./config.yaml"))
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    found.append((Path(xdg) / "rembgd" / "config.yaml", "$XDG_CONFIG_HOME/rembgd/config.yaml"))
    found.append((Path("/etc/rembgd/config.yaml"), "/etc/rembgd/config.yaml"))
    return found


def discover(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: ``--config``, ``$REMBGD_CONFIG``, ``./config.yaml``,
    ``$XDG_CONFIG_HOME/rembgd/config.yaml``, ``/etc/rembgd/config.yaml``; None: built-in
    defaults. A file named by ``--config`` or ``$REMBGD_CONFIG`` must exist."""
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


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)


def state_path(cfg: Config) -> Path:
    return cfg.state_file or cfg.cache.dir / "status.json"
