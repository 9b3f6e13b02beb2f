"""File-system edge: atomic writes, output naming, failed/ sidecars, safe moves.

Temp files are dot-prefixed (``.name.rembgd-XXXX``) in the destination folder, so
watchers and file browsers ignore them, and ``os.replace`` makes the final name
appear complete or not at all.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

TMP_MARK = ".rembgd-"
OUTPUT_SUFFIX = ".png"
ERROR_SUFFIX = ".error.json"
NAME_MAX = 255  # bytes per path component on Linux file systems (ext4, xfs, tmpfs, NFS, SMB)

# errno values that are worth retrying rather than failing the file for good
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT,
                    errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.EROFS}


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories
    finally:
        os.close(fd)


def name_bytes(name: str) -> int:
    return len(os.fsencode(name))


def clip_name(name: str, limit: int) -> str:
    """At most ``limit`` bytes of ``name``, cut on a character boundary (not ``name[:n]``:
    80 four-byte characters are 320 bytes, more than a file name may have)."""
    raw = os.fsencode(name)
    return name if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


def fit_name(name: str, suffix: str = "") -> str:
    """``name + suffix``, shortened (with a hash of the full name) to fit NAME_MAX."""
    if name_bytes(name + suffix) <= NAME_MAX:
        return name + suffix
    tag = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:10]
    return clip_name(name, NAME_MAX - name_bytes(tag + suffix)) + tag + suffix


def current_umask() -> int:
    """The process umask, read without changing it (os.umask() is racy across threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    ``mode`` defaults to what a plain ``open(path, "wb")`` would give (0o666 minus
    the umask), not mkstemp's private 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{clip_name(path.name, 80)}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode if mode is not None else output_mode(current_umask()))
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def output_mode(umask: int) -> int:
    return 0o666 & ~umask


def output_name(relative: Path) -> Path:
    """The naming rule: keep the full source name and append ``.png``.

    ``a.jpg`` -> ``a.jpg.png`` and ``a.png`` -> ``a.png.png``, so sources that
    differ only by extension never collide, and the rule is stateless.
    """
    return relative.with_name(relative.name + OUTPUT_SUFFIX)


def safe_relative(path: Path, root: Path) -> Path:
    """``path`` relative to ``root``; refuses anything that would escape it."""
    rel = Path(os.path.relpath(path, root))
    if rel.is_absolute() or ".." in rel.parts or str(rel) == ".":
        raise ValueError(f"{path} is outside {root}")
    return rel


def unique_destination(dest: Path) -> Path:
    """``dest`` if free, else ``dest`` with a timestamp counter before the suffix."""
    if not dest.exists():
        return dest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        cand = dest.with_name(fit_name(f"{dest.stem}.{stamp}-{n}", dest.suffix))
        if not cand.exists():
            return cand
    raise FileExistsError(dest)


def move_file(src: Path, dest: Path) -> Path:
    """Move without overwriting anything; works across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest = unique_destination(dest)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{clip_name(dest.name, 80)}{TMP_MARK}move-{os.getpid()}")
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            unlink_quietly(tmp)
            raise
        os.unlink(src)
    fsync_dir(dest.parent)
    return dest


def write_failure(src: Path, rel: Path, failed_dir: Path, *, reason: str, exc: BaseException,
                  detail: str, move: bool = True) -> Path:
    """Move ``src`` under ``failed_dir`` (keeping subfolders) with a .error.json sidecar."""
    dest = failed_dir / rel
    if move and (src.is_file() and not src.is_symlink()):
        dest = move_file(src, dest)
    record = {
        "source": str(src),
        "file": str(dest if move else src),
        "reason": reason,
        "error": detail,
        "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix_time": time.time(),
    }
    sidecar = dest.with_name(fit_name(dest.name, ERROR_SUFFIX))  # even for a 255-byte name
    atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode())
    return sidecar


def is_temp_name(name: str) -> bool:
    return TMP_MARK in name
