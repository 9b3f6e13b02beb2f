"""The page's HTML: Jinja2 templates (``daemon/web/templates/``) with autoescaping on,
so every file name, sidecar value and config value is escaped by default."""
from __future__ import annotations

import time

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

_env = Environment(loader=PackageLoader("daemon.web", "templates"),
                   autoescape=select_autoescape(["html"], default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) \
    if t else ""


def render(name: str, **context) -> str:
    return _env.get_template(name).render(**context)
