"""The no-download guard: rembg fetches models through ``pooch.retrieve``; rembgd never does.

``refuse_downloads()`` replaces ``pooch.retrieve`` with a function that raises
ModelError. It is explicit (called by the runtime set-up and by ``Engines``),
idempotent, and reversible only inside ``downloads_allowed()``, which the
``models install --allow-download`` command uses and nothing else.
"""
from __future__ import annotations

import contextlib
import threading

from daemon.inference.models import ModelError

_lock = threading.Lock()
_original = None  # pooch's own retrieve, once we replaced it


def _refuse(url, *args, **kwargs):
    raise ModelError(f"refusing to download {url}: rembgd never fetches models at run time; "
                     "run `rembgd models install`")


def refuse_downloads() -> None:
    """Make ``pooch.retrieve`` raise ModelError (idempotent)."""
    global _original
    import pooch

    with _lock:
        if pooch.retrieve is not _refuse:
            _original = pooch.retrieve
            pooch.retrieve = _refuse


def downloads_refused() -> bool:
    import pooch

    return pooch.retrieve is _refuse


@contextlib.contextmanager
def downloads_allowed():
    """Let pooch download inside the block (explicit ``--allow-download`` only)."""
    import pooch

    with _lock:
        patched = pooch.retrieve is _refuse
        if patched:
            pooch.retrieve = _original
    try:
        yield
    finally:
        if patched:
            with _lock:
                pooch.retrieve = _refuse
