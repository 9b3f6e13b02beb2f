"""Model files on disk: where they live, their install records, and how they are verified.

Layout of the models directory (config ``models.dir``)::

    u2netp.onnx                 a mask model, named after its rembg session
    u2netp.onnx.json            its install record: checksums, size, source, time, licence
    efficientnet-lite0.onnx     the embedder, converted here from the PyTorch checkpoint
    efficientnet-lite0.onnx.json

A model is valid when its file matches its record (md5 and sha256). A file
without a record is accepted only if it matches a checksum the registry knows
(the wheel's sha256 or rembg's md5); a legacy ``.md5`` sidecar counts as a
record. Checksums are computed once per process per file version (keyed by
path, inode, size, mtime and ctime). ``ModelFile.md5`` is the checksum that
keys the mask cache, so a model whose file changed is a cache miss.
This module only reads and verifies; ``install`` writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daemon.fsutil import atomic_write_bytes
from daemon.inference import registry
from daemon.inference.registry import FIX_COMMAND, ModelSpec

EMBEDDER_NAME = "efficientnet-lite0"
EMBEDDER_FILE = f"{EMBEDDER_NAME}.onnx"
MODEL_FILE_MODE = 0o644  # readable by the service user when installed by an admin
RECORD_SUFFIX = ".json"
LEGACY_SUFFIX = ".md5"


class ModelError(RuntimeError):
    """A model is missing, corrupt or unusable; the message names the command that fixes it."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: Path
    md5: str          # the checksum that keys the cache
    sha256: str = ""


@dataclass(frozen=True)
class Digests:
    size: int
    md5: str
    sha256: str


@dataclass
class Record:
    """What ``<model>.onnx.json`` says about the file next to it."""

    name: str
    size: int
    md5: str
    sha256: str
    source: str = "unknown"        # wheel requirement, source path, or a phrase
    source_kind: str = "unknown"   # wheel | file | converted | quantized | download | adopted | legacy
    installed_at: str = ""         # ISO 8601, UTC
    licence: str = ""
    warnings: list[str] = field(default_factory=list)
    quality: dict = field(default_factory=dict)  # a quantised model's gate result

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


# ------------------------------------------------------------------ checksums

_digest_lock = threading.Lock()
_digest_cache: dict[tuple, Digests] = {}


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def hash_file(path: Path) -> Digests:
    """md5 and sha256 of a model file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return Digests(size, md5.hexdigest(), sha.hexdigest())


def file_digests(path: Path) -> Digests:
    """md5 + sha256 of ``path``, hashed once per file version in this process."""
    key = _stat_key(path)
    with _digest_lock:
        hit = _digest_cache.get(key)
    if hit is None:
        hit = hash_file(path)
        if _stat_key(path) == key:  # not rewritten while we read it
            with _digest_lock:
                _digest_cache[key] = hit
    return hit


def remember_digests(path: Path, digests: Digests) -> None:
    """Seed the cache for a file we just wrote (and hashed while writing)."""
    with _digest_lock:
        _digest_cache[_stat_key(path)] = digests


def md5_file(path: Path) -> str:
    return file_digests(path).md5


# ------------------------------------------------------------------ paths, records


def mask_model_path(models_dir: Path, model: str) -> Path:
    return Path(models_dir) / f"{model}.onnx"


def embedder_path(models_dir: Path) -> Path:
    return Path(models_dir) / EMBEDDER_FILE


def record_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + RECORD_SUFFIX)


def legacy_sidecar(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + LEGACY_SUFFIX)


def read_record(path: Path, name: str) -> Record | None:
    """The install record of ``path``, a Record built from a legacy ``.md5`` sidecar, or None."""
    side = record_path(path)
    if side.is_file():
        try:
            raw = json.loads(side.read_text())
            return Record(**{k: v for k, v in raw.items() if k in Record.__dataclass_fields__})
        except (ValueError, TypeError) as exc:
            raise ModelError(f"the install record {side} of model {name!r} is unreadable ({exc}). "
                             f"Run `{_fix(name, '--force')}`") from exc
    legacy = legacy_sidecar(path)
    if legacy.is_file():
        return Record(name, -1, legacy.read_text().strip(), "", source_kind="legacy",
                      source=f"{legacy.name} (written by an older rembgd)")
    return None


def write_record(path: Path, record: Record) -> None:
    atomic_write_bytes(record_path(path), record.to_json(), mode=MODEL_FILE_MODE)
    legacy = legacy_sidecar(path)
    if legacy.exists():
        legacy.unlink()


def _fix(name: str, *extra: str) -> str:
    if name == EMBEDDER_NAME:
        return " ".join((FIX_COMMAND, *extra))
    spec = registry.SPECS.get(name)
    return spec.fix(*extra) if spec else " ".join((FIX_COMMAND, "--model", name, *extra))


# ------------------------------------------------------------------ verification


def model_spec(name: str) -> ModelSpec:
    """The registry spec, or ModelError for an unknown name or a remote API session."""
    try:
        found = registry.spec(name)
    except registry.UnknownModel as exc:
        raise ModelError(f"rembgd does not know model {name!r}: {exc}") from None
    if not found.local:
        raise ModelError(
            f"model {name!r} is a remote API in rembg: images would leave this machine. "
            "rembgd only runs local models (e.g. u2netp)")
    return found


def _known_match(spec: ModelSpec | None, d: Digests) -> str | None:
    if spec is None:
        return None
    if spec.wheel and d.sha256 == spec.wheel.sha256:
        return f"wheel {spec.wheel.requirement}"
    if spec.rembg_md5 and d.md5 == spec.rembg_md5:
        return "rembg's own download"
    return None


def verify(path: Path, name: str, spec: ModelSpec | None) -> tuple[Digests, Record | None]:
    """Digests of an existing model file checked against its record (or a known checksum)."""
    d = file_digests(path)
    rec = read_record(path, name)
    if rec is not None:
        wanted = [("md5", d.md5, rec.md5)] + ([("sha256", d.sha256, rec.sha256)] if rec.sha256 else [])
        for algo, got, expected in wanted:
            if got != expected:
                raise ModelError(
                    f"model {name!r} at {path} is corrupt ({algo} {got}, recorded {expected}). "
                    f"Run `{_fix(name, '--force')}`")
        return d, rec
    if _known_match(spec, d) is None:
        raise ModelError(
            f"model {name!r} at {path} has no install record and is not a file rembgd knows "
            f"(md5 {d.md5}). Run `{_fix(name, '--force')}`")
    return d, None


def checked_mask_model(models_dir: Path, model: str) -> ModelFile:
    """The verified mask model (no ONNX session, no rembg), or ModelError saying how to fix it."""
    spec = model_spec(model)
    path = mask_model_path(models_dir, model)
    if not path.is_file():
        raise ModelError(
            f"model {model!r} is not provisioned: {path} is missing. "
            f"Run `{spec.fix()}` (models dir: {models_dir})")
    d, _ = verify(path, model, spec)
    return ModelFile(model, path, d.md5, d.sha256)


def checked_embedder(models_dir: Path) -> ModelFile:
    path = embedder_path(models_dir)
    if not path.is_file():
        raise ModelError(
            f"the EfficientNet-Lite0 embedder is not provisioned: {path} is missing. "
            f"Run `{FIX_COMMAND}`")
    d, rec = verify_embedder(path)
    return ModelFile(EMBEDDER_NAME, path, d.md5, d.sha256)


def verify_embedder(path: Path) -> tuple[Digests, Record | None]:
    d = file_digests(path)
    rec = read_record(path, EMBEDDER_NAME)
    if rec is not None and (d.md5 != rec.md5 or (rec.sha256 and d.sha256 != rec.sha256)):
        raise ModelError(f"embedder {path} is corrupt (md5 {d.md5}, recorded {rec.md5}). "
                         f"Run `{FIX_COMMAND} --force`")
    return d, rec


# ------------------------------------------------------------------ loadability


def check_image_input(name: str, inputs, input_size: int, where: str, fix: str) -> None:
    """The model must take one float 1x3xHxW image (H, W symbolic or ``input_size``)."""

    def bad(why: str) -> ModelError:
        return ModelError(f"model {name!r} at {where} is not a usable {name} model: {why}. "
                          f"Run `{fix}` with the right .onnx")

    if len(inputs) != 1:
        raise bad(f"it has {len(inputs)} inputs, expected one image tensor")
    arg = inputs[0]
    shape = list(arg.shape or [])
    if arg.type != "tensor(float)":
        raise bad(f"its input {arg.name!r} is {arg.type}, expected tensor(float)")
    if len(shape) != 4:
        raise bad(f"its input {arg.name!r} has shape {shape} (rank {len(shape)}), "
                  "expected 1x3xHxW")
    n, c, h, w = shape
    fixed = lambda dim: isinstance(dim, int) and dim > 0  # noqa: E731
    if (fixed(n) and n != 1) or c != 3 or any(fixed(x) and x != input_size for x in (h, w)):
        raise bad(f"its input {arg.name!r} has shape {shape}, expected "
                  f"[1, 3, {input_size}, {input_size}] (or symbolic H, W)")


def probe(path: Path, spec: ModelSpec, fix: str | None = None) -> None:
    """Open ``path`` in ONNX Runtime and check its input: ModelError if it would not run."""
    import onnxruntime as ort

    fix = fix or spec.fix("--force")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own non-RuntimeError classes
        raise ModelError(f"model {spec.name!r}: {path} does not load as an ONNX model "
                         f"({type(exc).__name__}: {str(exc)[:200]}). Run `{fix}`") from None
    check_image_input(spec.name, sess.get_inputs(), spec.input_size, str(path), fix)
