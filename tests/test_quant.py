"""Quantised models: installed offline, deterministic, keyed by their checksum, gated on quality.

The recipe's quantisation of u2netp is the one expensive step (45 CPU-s with its gate), so
it runs once per CI run: `make models` provisions u2netp-int8, or ``int8_dir`` does on a
fresh machine (or when the installed file was made with an older recipe). The tests reuse
it; determinism and the refusal quantise on 3 calibration photos only (~6 s each).
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
from daemon.inference.engine import Engines, U2netSession
from daemon.inference.models import ModelError, mask_model_path, read_record

INT8 = "u2netp-int8"
FEW = 3  # calibration photos for the cheap quantisations


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _current(models_dir: Path) -> bool:
    path = mask_model_path(models_dir, INT8)
    return path.is_file() and quantize.RECIPE in read_record(path, INT8).source


@pytest.fixture(scope="session")
def int8_dir(models_dir: Path) -> Path:
    """The shared models dir with u2netp-int8 of the current recipe (as `make models` does)."""
    if not _current(models_dir):
        cfg = models_dir.parent / "models-install-int8.yaml"
        cfg.write_text(yaml.safe_dump({"models": {"dir": str(models_dir)}}))
        subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "models", "install",
                        "--model", "u2netp", "--quantize", "int8"], check=True)
    return models_dir


@pytest.fixture
def few_photos(monkeypatch):
    """Calibrate on 3 photos: the mechanics of the recipe at a fraction of its cost."""
    images = quantize.calibration_images()[:FEW]
    monkeypatch.setattr(quantize, "calibration_images", lambda: images)
    return images


def _fp32_only(models_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("u2netp.onnx", "u2netp.onnx.json", "efficientnet-lite0.onnx",
                 "efficientnet-lite0.onnx.json"):
        shutil.copy2(models_dir / name, dest / name)
    return dest


def test_installed_model_is_recorded_and_left_alone(int8_dir, tmp_path):
    path = mask_model_path(int8_dir, INT8)
    rec = read_record(path, INT8)
    assert rec.source_kind == "quantized" and rec.sha256 == _sha256(path)
    assert quantize.RECIPE in rec.source and registry.SPECS["u2netp"].wheel.sha256 in rec.source
    assert rec.quality["passed"] and rec.quality["mean_iou"] >= quantize.GATE_MEAN_IOU
    assert rec.quality["calibration_images"] == len(quantize.calibration_images())
    # the output conv, the two convs reading the photo and stage 1's residual Add stay float
    assert {"Conv_1047", "Conv_0", "Conv_2", "Add_134"} <= set(rec.quality["float_nodes"])
    # idempotent: a valid install of the current recipe is left alone, no quantisation
    fresh = _fp32_only(int8_dir, tmp_path / "models")
    for suffix in (".onnx", ".onnx.json"):
        shutil.copy2(int8_dir / f"{INT8}{suffix}", fresh / f"{INT8}{suffix}")
    logged = []
    (again,) = inst.install(fresh, [INT8], log=logged.append)[1:]
    assert again.action == "already" and again.sha256 == rec.sha256
    assert not any("quantising" in line for line in logged)


def test_the_ops_between_convs_run_in_int8_except_the_float_nodes(int8_dir):
    import onnx

    path = mask_model_path(int8_dir, INT8)
    graph = onnx.load(str(path)).graph
    made_by = {t: n.op_type for n in graph.node for t in n.output}
    readers: dict[str, set] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, set()).add(n.op_type)
    between = {n.name: n for n in graph.node
               if n.op_type in set(quantize.QUANTISED_OPS) - {"Conv"}}

    def int8(n) -> bool:  # QDQ: every activation read dequantised, the output re-quantised
        data = n.input[:1] if n.op_type == "Resize" else n.input
        return (all(made_by.get(t) == "DequantizeLinear" for t in data if t in made_by)
                and readers.get(n.output[0]) == {"QuantizeLinear"})

    quantised = {name for name, n in between.items() if int8(n)}
    assert {"Concat", "Add", "MaxPool", "Resize"} <= {between[x].op_type for x in quantised}
    assert len(quantised) > 80
    # the photo's full-resolution features stay float up to the next convs, and so does the head
    floats = set(read_record(path, INT8).quality["float_nodes"])
    assert {"MaxPool_4", "Add_134", "Concat_809", "Concat_1046"} <= floats
    assert not floats & quantised


def test_quantisation_is_deterministic(int8_dir, tmp_path, few_photos):
    src = mask_model_path(int8_dir, "u2netp")
    first = quantize.quantize(src, tmp_path / "a.onnx", registry.spec("u2netp"))
    quantize.quantize(src, tmp_path / "b.onnx", registry.spec("u2netp"))
    assert first.calibration_images == FEW
    assert _sha256(tmp_path / "a.onnx") == _sha256(tmp_path / "b.onnx")


def test_an_older_recipe_is_quantised_again(int8_dir, tmp_path, few_photos, monkeypatch):
    fresh = _fp32_only(int8_dir, tmp_path / "models")
    for suffix in (".onnx", ".onnx.json"):
        shutil.copy2(int8_dir / f"{INT8}{suffix}", fresh / f"{INT8}{suffix}")
    old = _sha256(fresh / f"{INT8}.onnx")
    monkeypatch.setattr(quantize, "RECIPE", quantize.RECIPE + "-next")
    monkeypatch.setattr(quantize, "gate", lambda fp32, int8: _passing())
    logged = []
    (res,) = inst.install(fresh, [INT8], log=logged.append)[1:]
    assert res.action == "replaced" and res.sha256 != old  # 3 photos: another file
    assert any("older recipe" in line for line in logged)
    assert quantize.RECIPE in read_record(res.path, INT8).source


def _passing() -> quantize.GateResult:
    return quantize.GateResult(1.0, 1.0, "astronaut", {"astronaut": 1.0}, {}, True)


def test_mask_key_changes_with_the_model(int8_dir):
    engines = Engines(int8_dir, threads=1)
    fp32, int8 = engines.model_file("u2netp"), engines.model_file(INT8)
    assert isinstance(engines.mask(INT8).session, U2netSession)  # its spec's runner, not rembg
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


def test_an_install_failing_its_gate_refuses(int8_dir, tmp_path, monkeypatch, few_photos):
    # the naive recipe (every Conv quantised: the input convs, the head and the constant
    # channels included) wrecks the masks: the install must say so and write nothing
    monkeypatch.setattr(quantize, "input_convs", lambda model: set())
    monkeypatch.setattr(quantize, "head_nodes", lambda model: set())
    monkeypatch.setattr(quantize, "constant_channel_nodes", lambda model, channels: set())
    monkeypatch.setattr(quantize, "PHOTOS", quantize.SUBJECT_PHOTOS[:FEW])  # gate on 3 photos
    fresh = _fp32_only(int8_dir, tmp_path / "models")
    before = sorted(p.name for p in fresh.iterdir())
    with pytest.raises(ModelError) as err:
        inst.install(fresh, [INT8])
    msg = str(err.value)
    assert "u2netp-int8 is not offered" in msg and "fails its quality gate" in msg
    assert "keep using u2netp" in msg and "on 3 real photos: mean" in msg
    assert sorted(p.name for p in fresh.iterdir()) == before


def test_quantize_flag_names_the_variant():
    assert registry.quantised_name("u2net", "int8") == "u2net-int8"
    assert registry.quantised_name("u2netp-int8", "int8") == "u2netp-int8"
    with pytest.raises(registry.UnknownModel, match="no int8 variant of 'isnet-general-use'"):
        registry.quantised_name("isnet-general-use", "int8")
    spec = registry.spec("u2net-int8")
    assert spec.base == "u2net" and spec.fix() == "rembgd models install --model u2net-int8"
