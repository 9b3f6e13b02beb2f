"""Command line: ``rembgd run | process | status | config show|reference | models | cache``.

The only part of rembgd that prints. The config is found by discovery
(``--config``, ``$REMBGD_CONFIG``, ``./config.yaml``,
``$XDG_CONFIG_HOME/rembgd/config.yaml``, ``/etc/rembgd/config.yaml``, else
built-in defaults); ``run`` needs a file with watch pairs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from daemon import __version__, logs, runtime
from daemon import config as configmod
from daemon.cli import cache as cache_cli
from daemon.cli import models as models_cli
from daemon.cli import process as process_cli
from daemon.config import Config, ConfigError, reference
from daemon.inference.models import ModelError

EXIT_CONFIG = 2
EXIT_MODEL = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rembgd", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"rembgd {__version__}")
    p.add_argument("-c", "--config", default=None,
                   help="config file (default: discovered; see `rembgd config show`)")
    p.add_argument("--log-format", choices=("auto", "json", "text"), help="override logging.format")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="watch the inboxes (the long-running service)")
    run.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    run.add_argument("--once", action="store_true",
                     help="process what is pending, then exit (no watching)")

    process_cli.add_parser(sub)

    st = sub.add_parser("status", help="print the live counters of a running daemon")
    st.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    st.add_argument("--json", action="store_true")

    conf = sub.add_parser("config", help="the effective config and where it came from, "
                          "or the reference of every key")
    csub = conf.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective config (YAML-like JSON)")
    show.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    csub.add_parser("reference", help="print every config key, its type, default and meaning "
                    "(Markdown: docs/configuration.md)")

    models_cli.add_parser(sub)
    cache_cli.add_parser(sub)
    return p


def load_config(args: argparse.Namespace, *, check_folders: bool = True) -> Config:
    path = getattr(args, "config_sub", None) or args.config
    cfg = configmod.load_effective(path, check_folders=check_folders)
    if args.log_format or args.log_level:
        cfg = configmod.replace(cfg, log_format=args.log_format or cfg.log_format,
                                log_level=args.log_level or cfg.log_level)
    return cfg


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


def cmd_config_show(cfg: Config) -> int:
    source = configmod.BUILTIN if configmod.is_builtin(cfg) else str(cfg.source)
    print(f"# effective config, from {source}")
    print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "reference":
        print(reference.markdown(), end="")  # the schema's, whatever config is in force
        return 0
    try:
        cfg = load_config(args, check_folders=args.command == "run")
    except ConfigError as exc:
        print(f"rembgd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    runtime.configure(cfg)
    try:
        if args.command == "process":
            return process_cli.run(args, cfg)
        if args.command == "models":
            return models_cli.run(args, cfg)
        if args.command == "status":
            return cmd_status(args, cfg)
        if args.command == "config":
            return cmd_config_show(cfg)
        if args.command == "run":
            from daemon.service.supervisor import run_service

            return run_service(cfg, once=args.once)
        if args.command == "cache":
            return cache_cli.run(args, cfg)
    except ModelError as exc:
        print(f"rembgd: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
