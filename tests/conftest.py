"""Shared fixtures: provisioned models, real photos, configs, Redis."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("REMBGD_TEST_MODELS", ROOT / "var" / "models"))
REDIS_URL = os.environ.get("REMBGD_TEST_REDIS", "redis://127.0.0.1:6379/0")


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


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "u2netp.onnx").is_file() or not (MODELS_DIR / "efficientnet-lite0.onnx").is_file():
        cfg = MODELS_DIR.parent / "models-install.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump({"models": {"dir": str(MODELS_DIR)}}))
        subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "models", "install"], check=True)
    return MODELS_DIR


def write_config(tmp_path: Path, models_dir: Path, **overrides) -> Path:
    """A config with inbox/outbox/cache under tmp_path; ``overrides`` merge at top level."""
    for d in ("inbox", "outbox"):
        (tmp_path / d).mkdir(exist_ok=True)
    data = {
        "watch": [{"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")}],
        "models": {"dir": str(models_dir)},
        "cache": {"dir": str(tmp_path / "cache")},
        "settle_s": 0.3,
        "poll_interval_s": 0.2,
        "threads": 2,
        "logging": {"format": "json"},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session", autouse=True)
def imaging_settings():
    """What `rembgd` sets at start (daemon.runtime), for tests that decode directly."""
    from daemon import runtime
    from daemon.imaging.decode import DEFAULT_MAX_PIXELS

    runtime.configure_imaging(DEFAULT_MAX_PIXELS)


@pytest.fixture
def config_path(tmp_path, models_dir) -> Path:
    return write_config(tmp_path, models_dir)


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


@pytest.fixture
def models_cli(capsys):
    """`rembgd models ...` through daemon.cli.models, in this process: (rc, stdout, stderr)."""
    import argparse

    from daemon import config as configmod
    from daemon.cli import models as cli_models

    parser = argparse.ArgumentParser(prog="rembgd")
    cli_models.add_parser(parser.add_subparsers(dest="command"))

    def run(config: Path, *args):
        cfg = configmod.load(config, check_folders=False)
        rc = cli_models.run(parser.parse_args(["models", *map(str, args)]), cfg)
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def shared_engines(models_dir):
    from daemon.inference.engine import Engines

    return Engines(models_dir, threads=2)


def _redis_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=2)


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the real Redis; removed afterwards.

    Under CI=true a missing Redis is a failure, never a skip.
    """
    import redis

    client = _redis_client()
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required under CI but is not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"rembgd-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


@pytest.fixture
def inferences(shared_engines, monkeypatch):
    """Counts calls of the real u2netp engine's predict (which still runs)."""
    engine = shared_engines.mask("u2netp")
    real = engine.predict
    calls: list[int] = []
    lock = threading.Lock()

    def counted(rgb):
        with lock:
            calls.append(1)
        return real(rgb)

    monkeypatch.setattr(engine, "predict", counted)
    return calls


def png_alpha(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))[..., 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis():
    """A redis-server of our own (never the shared one), so that a test can stop it."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, socket_timeout=0.5)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    deadline = time.monotonic() + 5
    while not up():
        assert time.monotonic() < deadline, "own redis-server did not start"
        time.sleep(0.02)
    proc.url = f"redis://127.0.0.1:{port}/0"
    yield proc
    client.close()
    proc.kill()
    proc.wait(5)
