"""Shared fixtures: provisioned models, configs, engines, Redis (plain helpers: helpers.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import MODELS_DIR, REDIS_URL, free_port, write_config


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "u2netp.onnx").is_file() or not (MODELS_DIR / "efficientnet-lite0.onnx").is_file():
        cfg = MODELS_DIR.parent / "models-install.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump({"models": {"dir": str(MODELS_DIR)}}))
        subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "models", "install"], check=True)
    return MODELS_DIR


@pytest.fixture(scope="session", autouse=True)
def matting_kernels_compiled_aside():
    """pymatting (rembg's alpha matting) compiles its numba kernels when first imported and
    caches them beside its source: ~38 s of one core in a fresh venv (as in CI), then
    ~1 s. Compile them in a second process while the first tests run, so the first test
    that mats loads them instead of waiting (the suite keeps one core busy on average)."""
    proc = subprocess.Popen([sys.executable, "-c", "import pymatting"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def imaging_settings():
    """What `rembgd` sets at start (daemon.runtime), for tests that decode directly."""
    from daemon import runtime
    from daemon.imaging.decode import DEFAULT_MAX_PIXELS

    runtime.configure_imaging(DEFAULT_MAX_PIXELS)


@pytest.fixture
def config_path(tmp_path, models_dir) -> Path:
    return write_config(tmp_path, models_dir)


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
