"""Plain helpers shared by the tests (and the benches): real photos, encoders, the config
writer, a pipeline over an opened store. Fixtures live in conftest.py."""
from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("REMBGD_TEST_MODELS", ROOT / "var" / "models"))
REDIS_URL = os.environ.get("REMBGD_TEST_REDIS", "redis://127.0.0.1:6379/0")
FAST = {"settle_s": 0.3, "poll_interval_s": 0.2, "threads": 2}  # the tests' quick timings


def photo(name: str) -> np.ndarray:
    """RGB uint8 array of a scikit-image sample photo (grey ones are stacked to RGB)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.dstack([arr] * 3)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def encode(rgb: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def write_config(folder: Path, models: Path, *, pair: dict | None = None, fast: bool = True,
                 **overrides) -> Path:
    """``folder``/config.yaml: one pair ``folder``/inbox -> ``folder``/outbox (with ``pair``'s
    keys), the cache in ``folder``/cache, JSON logs and (``fast``) the tests' quick timings.
    ``overrides`` merge at the top level (a mapping into a mapping:
    ``logging={"level": "warning"}`` keeps the JSON format)."""
    for sub in ("inbox", "outbox"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    data = {"watch": [{"inbox": str(folder / "inbox"), "outbox": str(folder / "outbox"),
                       **(pair or {})}],
            "models": {"dir": str(models)}, "cache": {"dir": str(folder / "cache")},
            **(FAST if fast else {}), "logging": {"format": "json"}}
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(data.get(key), dict)
        data[key] = {**data[key], **value} if both else value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pipeline_over(cfg, engines, store=None):
    """A real Pipeline for ``cfg`` over an already opened ``store`` (None: no cache)."""
    from daemon.cache.guard import CacheGuard
    from daemon.coord.locks import open_locks
    from daemon.pipeline import Pipeline

    guard = locks = None
    if store is not None:
        guard = CacheGuard(cfg.store, cfg.cache, opener=lambda: store)
        locks = open_locks(cfg.store, cfg.cache.dir, link=getattr(store, "link", None))
    return Pipeline(engines, guard, locks, cfg.cache, max_pixels=cfg.max_image_pixels,
                    claim_ttl_s=cfg.store.claim_ttl_s)


def unstamped(data: bytes) -> bytes:
    """A rendered PNG without its source stamp (a tEXt chunk right after IHDR): what the
    cache stores, the same for every source of the same pixels."""
    from daemon.imaging.stamp import KEY, read_stamp

    assert read_stamp(io.BytesIO(data)) is not None
    return data[:33] + data[33 + 12 + len(KEY) + 1 + 64:]


def render_legacy(pipeline, data: bytes, options):
    """The legacy single-PNG plan (the `output:` section), its cache writes committed as
    the job does after writing the files; ``.files[""]`` is the PNG."""
    from daemon.pipeline import Plan

    rendered = pipeline.render(data, Plan(options))
    if rendered.cache_writes:
        pipeline.masks.commit(rendered.cache_writes)
    return rendered


def pixel_difference(a: bytes, b: bytes) -> str:
    """Where two RGBA PNGs' pixels differ (for an assertion's message): the size, or the
    count of differing pixels, the largest difference per channel and the first pixel."""
    with Image.open(io.BytesIO(a)) as ia, Image.open(io.BytesIO(b)) as ib:
        x, y = np.asarray(ia.convert("RGBA"), np.int16), np.asarray(ib.convert("RGBA"), np.int16)
    if x.shape != y.shape:
        return f"sizes {x.shape} and {y.shape}"
    diff = np.abs(x - y)
    where = np.argwhere(diff.any(axis=-1))
    if not len(where):
        return "same pixels, other bytes"
    r, c = where[0]
    return (f"{len(where)} pixels differ, max per channel (R, G, B, A) "
            f"{tuple(int(v) for v in diff.max(axis=(0, 1)))}, first at row {r} col {c}: "
            f"{tuple(int(v) for v in x[r, c])} vs {tuple(int(v) for v in y[r, c])}")


def png_alpha(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))[..., 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cut_from(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colours a deliverable holds by default (``hidden: clear``): the photo's own,
    black under alpha 0."""
    out = np.array(rgb, copy=True)
    out[alpha == 0] = 0
    return out
