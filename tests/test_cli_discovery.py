"""Config discovery and a newcomer's first run: `rembgd` from any folder, no config file.

Every case runs the real CLI in a subprocess with HOME and XDG_* pointing at temp
folders, so nothing of this machine's own config, cache or models is seen.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import MODELS_DIR, encode, photo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path):
    """An empty working folder and a fresh HOME / XDG environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "REMBGD_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
               XDG_DATA_HOME=str(tmp_path / "xdg-data"), PYTHONPATH=str(ROOT))
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "home").mkdir()
    return {"env": env, "cwd": work, "tmp": tmp_path}


def rembgd(home, *args, env=None):
    return subprocess.run([sys.executable, "-m", "daemon", *map(str, args)], cwd=home["cwd"],
                          env={**home["env"], **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def install_models(home) -> Path:
    """What `rembgd models install` leaves in the XDG data folder (copied: no download)."""
    target = Path(home["env"]["XDG_DATA_HOME"]) / "rembgd" / "models"
    target.mkdir(parents=True)
    for name in ("u2netp.onnx", "efficientnet-lite0.onnx"):
        shutil.copy(MODELS_DIR / name, target / name)
        for side in (".json", ".md5"):
            if (MODELS_DIR / (name + side)).exists():
                shutil.copy(MODELS_DIR / (name + side), target / (name + side))
    return target


def test_process_without_any_config_says_how_to_install_models(home):
    (home["cwd"] / "photos").mkdir()
    (home["cwd"] / "photos" / "cat.jpg").write_bytes(encode(photo("chelsea")[::4, ::4]))
    res = rembgd(home, "process", "photos", "--out", "cutouts")
    assert res.returncode == 3, res.stderr
    assert "rembgd models install" in res.stderr and "config error" not in res.stderr
    assert str(Path(home["env"]["XDG_DATA_HOME"]) / "rembgd" / "models") in res.stderr


def test_process_without_any_config_works_once_models_are_installed(home):
    install_models(home)
    (home["cwd"] / "photos").mkdir()
    (home["cwd"] / "photos" / "cat.jpg").write_bytes(encode(photo("chelsea")[::4, ::4]))
    res = rembgd(home, "process", "photos", "--out", "cutouts")
    assert res.returncode == 0, res.stderr
    assert "1 files: exact 0, pixel 0, near 0, miss 1, failed 0" in res.stdout
    assert (home["cwd"] / "cutouts" / "cat.jpg.png").is_file()
    cache = Path(home["env"]["XDG_CACHE_HOME"]) / "rembgd"
    assert (cache / "index.sqlite3").is_file()  # the cache went to the XDG cache folder
    again = rembgd(home, "process", "photos", "--out", "again")
    assert "exact 1" in again.stdout, again.stdout + again.stderr


def test_config_show_names_the_source_in_discovery_order(home):
    res = rembgd(home, "config", "show")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("# effective config, from built-in defaults")
    shown = json.loads(res.stdout.split("\n", 1)[1])
    assert shown["cache"]["dir"] == str(Path(home["env"]["XDG_CACHE_HOME"]) / "rembgd")
    assert shown["models_dir"] == str(Path(home["env"]["XDG_DATA_HOME"]) / "rembgd" / "models")

    xdg = Path(home["env"]["XDG_CONFIG_HOME"]) / "rembgd" / "config.yaml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text(yaml.safe_dump({"workers": 3}))
    res = rembgd(home, "config", "show")
    assert res.stdout.startswith(f"# effective config, from {xdg}"), res.stdout[:200]

    local = home["cwd"] / "config.yaml"  # ./config.yaml comes before the XDG one
    local.write_text(yaml.safe_dump({"workers": 4}))
    res = rembgd(home, "config", "show")
    assert res.stdout.startswith(f"# effective config, from {local.resolve()}")
    assert json.loads(res.stdout.split("\n", 1)[1])["workers"] == 4

    named = home["tmp"] / "elsewhere.yaml"  # $REMBGD_CONFIG comes before both
    named.write_text(yaml.safe_dump({"workers": 5}))
    res = rembgd(home, "config", "show", env={"REMBGD_CONFIG": str(named)})
    assert json.loads(res.stdout.split("\n", 1)[1])["workers"] == 5

    res = rembgd(home, "--config", local, "config", "show", env={"REMBGD_CONFIG": str(named)})
    assert json.loads(res.stdout.split("\n", 1)[1])["workers"] == 4  # --config wins


def test_a_named_config_that_is_missing_is_an_error_naming_it(home):
    res = rembgd(home, "--config", "nope.yaml", "config", "show")
    assert res.returncode == 2 and "nope.yaml" in res.stderr and "cannot read" in res.stderr
    res = rembgd(home, "config", "show", env={"REMBGD_CONFIG": "/nonexistent/rembgd.yaml"})
    assert res.returncode == 2 and "/nonexistent/rembgd.yaml" in res.stderr


def test_run_without_a_config_file_says_what_is_missing(home):
    res = rembgd(home, "run")
    assert res.returncode == 2
    assert "no config file found" in res.stderr and "/etc/rembgd/config.yaml" in res.stderr
