"""structlog set-up: JSON under systemd (or --log-format json), readable text on a TTY."""
from __future__ import annotations

import logging
import os
import sys

import structlog


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def choose_format(requested: str = "auto") -> str:
    if requested in ("json", "text"):
        return requested
    return "json" if under_systemd() or not sys.stderr.isatty() else "text"


def setup(level: str = "info", fmt: str = "auto") -> None:
    fmt = choose_format(fmt)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
