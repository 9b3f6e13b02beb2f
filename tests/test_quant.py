"""Quantised models: installed offline, deterministic, keyed by their checksum, gated on quality.

Quantising u2netp takes ~20-50 s on 2 busy cores, so the shared models dir is provisioned
once (``make test`` does it; the fixture does it on a fresh machine) and only two tests
quantise again: determinism, and the refusal of a recipe that fails its gate.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import OutputOptions
from daemon.imaging.keys import mask_key
from daemon.inference import install as inst
from daemon.inference import quantize, registry
from daemon.inference.engine import Engines
from daemon.inference.models import ModelError, mask_model_path, read_record

INT8 = "u2netp-int8"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def int8_dir(models_dir: Path) -> Path:
    """The shared models dir with u2netp-int8 provisioned (as `make test` does)."""
    if not mask_model_path(models_dir, INT8).is_file():
        cfg = models_dir.parent / "models-install-int8.yaml"
        cfg.write_text(yaml.safe_dump({"models": {"dir": str(models_dir)}}))
        subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "models", "install",
                        "--model", "u2netp", "--quantize", "int8"], check=True)
    return models_dir


def _fp32_only(models_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("u2netp.onnx", "u2netp.onnx.json", "efficientnet-lite0.onnx",
                 "efficientnet-lite0.onnx.json"):
        shutil.copy2(models_dir / name, dest / name)
    return dest


def test_install_is_deterministic_and_recorded(int8_dir, tmp_path):
    fresh = _fp32_only(int8_dir, tmp_path / "models")
    logged = []
    (res,) = inst.install(fresh, [INT8], log=logged.append)[1:]
    assert res.action == "installed"
    assert res.sha256 == _sha256(int8_dir / f"{INT8}.onnx")  # same file, quantised again
    rec = read_record(res.path, INT8)
    assert rec.source_kind == "quantized" and rec.sha256 == res.sha256
    assert quantize.RECIPE in rec.source and registry.SPECS["u2netp"].wheel.sha256 in rec.source
    assert rec.quality["passed"] and rec.quality["mean_iou"] >= quantize.GATE_MEAN_IOU
    assert "Conv_1047" in rec.quality["float_nodes"]  # the output conv stays float
    assert any("mask IoU against fp32" in line for line in logged)
    # idempotent: a valid install is left alone, no second quantisation
    (again,) = inst.install(fresh, [INT8])[1:]
    assert again.action == "already" and again.sha256 == res.sha256
    assert sorted(p.name for p in fresh.iterdir()) == sorted(
        ["u2netp.onnx", "u2netp.onnx.json", "efficientnet-lite0.onnx",
         "efficientnet-lite0.onnx.json", f"{INT8}.onnx", f"{INT8}.onnx.json"])


def test_mask_key_changes_with_the_model(int8_dir):
    engines = Engines(int8_dir, threads=1)
    fp32, int8 = engines.model_file("u2netp"), engines.model_file(INT8)
    assert fp32.md5 != int8.md5
    keys = {mask_key(OutputOptions(model=m.name), m.md5) for m in (fp32, int8)}
    assert len(keys) == 2
    # the checksum alone changes the key too (a re-quantised file is a miss)
    assert mask_key(OutputOptions(model=INT8), int8.md5) != mask_key(OutputOptions(model=INT8), fp32.md5)


def test_quantised_masks_within_the_gate_on_real_photos(int8_dir):
    engines = Engines(int8_dir, threads=2)
    result = quantize.gate(engines.mask("u2netp"), engines.mask(INT8))
    assert len(result.per_photo) == len(quantize.SUBJECT_PHOTOS) >= 12
    assert result.mean_iou >= 0.97, result.summary()
    assert result.min_iou >= 0.90, result.summary()
    assert result.passed


def test_an_install_failing_its_gate_refuses(int8_dir, tmp_path, monkeypatch):
    # the naive recipe (every Conv quantised, the head and constant channels included)
    # wrecks the masks: the install must say so and write nothing
    monkeypatch.setattr(quantize, "head_nodes", lambda model: set())
    monkeypatch.setattr(quantize, "constant_channel_convs", lambda model, channels: set())
    fresh = _fp32_only(int8_dir, tmp_path / "models")
    before = sorted(p.name for p in fresh.iterdir())
    with pytest.raises(ModelError) as err:
        inst.install(fresh, [INT8])
    msg = str(err.value)
    assert "u2netp-int8 is not offered" in msg and "fails its quality gate" in msg
    assert "keep using u2netp" in msg and "mean" in msg
    assert sorted(p.name for p in fresh.iterdir()) == before


def test_quantize_flag_names_the_variant():
    assert registry.quantised_name("u2net", "int8") == "u2net-int8"
    assert registry.quantised_name("u2netp-int8", "int8") == "u2netp-int8"
    with pytest.raises(registry.UnknownModel, match="no int8 variant of 'isnet-general-use'"):
        registry.quantised_name("isnet-general-use", "int8")
    spec = registry.spec("u2net-int8")
    assert spec.base == "u2net" and spec.fix() == "rembgd models install --model u2net-int8"
