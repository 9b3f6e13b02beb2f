"""Link-proof reads and writes: the inbox source, the shared outbox, ``failed/``, ``done/``, the ledger.

Anyone with write access to a share can fill it with symbolic links. These
functions walk from the configured root folder one component at a time with
``O_NOFOLLOW`` and directory fds, create temp files with ``O_EXCL|O_NOFOLLOW``
and rename with ``renameat``, so no write ever goes through a link: a link
below the root raises ``LinkedPathError``. The root itself may be a link the
admin set up; it is resolved once. Also: the read of a source
(``read_regular_file``: never a link, a FIFO or a folder), failed/ sidecars (written
and read here: ``write_failure``, ``failure_sidecars``, ``read_failure``) and
the clean-up of this daemon's stale temp files.

These are mechanisms, not decisions: who writes where is decided by their
callers (``daemon.job`` and ``daemon.fate``; see docs/architecture.md).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from daemon.fsutil import (DIR_FLAGS, ERROR_SUFFIX, STALE_TEMP_S, create_temp, fill_temp,
                           fit_name, fsync_fd_quietly, is_temp_name, safe_relative,
                           stamped_name, temp_orphaned, unlink_quietly)


class LinkedPathError(OSError):
    """A symbolic link where rembgd would write (errno ELOOP; never transient)."""

    def __init__(self, link: Path):
        super().__init__(errno.ELOOP,
                         f"{link} is a symbolic link; rembgd never writes through links", str(link))
        self.link = Path(link)

    def __str__(self) -> str:
        return self.strerror


class InputError(ValueError):
    """The input is not a processable regular file (symlink, FIFO, folder...)."""

    reason = "not_a_file"


class LinkedInput(InputError):
    """The path leads through a symbolic link; never followed, and never moved to failed/."""

    reason = "symlink"


def read_regular_file(path: Path, root: Path | None = None) -> bytes:
    """Read a regular file without following a symlink; refuse FIFOs, folders, devices.

    With ``root``, the file actually opened must lie under it: a folder on the way
    swapped for a symlink after the checks cannot lead the read out of the inbox.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the final component is a symlink
            raise LinkedInput(f"{path} is a symbolic link; links are never followed") from exc
        if exc.errno == errno.EISDIR:
            raise InputError(f"{path} is a directory, not an image") from exc
        if exc.errno == errno.ENXIO:  # a FIFO with no writer
            raise InputError(f"{path} is a FIFO, not a regular file") from exc
        raise
    try:
        if root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the intake's own path check has to do
                real = None
            top = os.path.realpath(root)
            if real is not None and not real.startswith(top.rstrip("/") + "/"):
                raise LinkedInput(f"{path} leads out of {top} through a symbolic link "
                                  f"(to {real}); links are never followed")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------- link-proof writers for shared folders


def _plain_parts(rel: Path) -> tuple[str, ...]:
    rel = Path(rel)
    if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts):
        raise ValueError(f"{rel} is not a plain relative path")
    return rel.parts


def _open_child_dir(parent_fd: int, name: str, shown: Path, create: bool) -> int:
    """fd of folder ``name`` inside ``parent_fd``, made if missing; never through a link."""
    for _ in range(5):  # another process may make or remove it meanwhile
        try:
            return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=parent_fd)
            except FileExistsError:
                pass  # made meanwhile, or a dangling link: the next open tells
        except OSError as exc:  # O_NOFOLLOW|O_DIRECTORY on a link: ENOTDIR (or ELOOP)
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise LinkedPathError(shown) from None
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(shown)) from None
    raise FileNotFoundError(errno.ENOENT, "folder keeps disappearing", str(shown))


@contextmanager
def dir_under(root: Path, rel_dir: Path = Path(), *, create: bool = True,
              make_root: bool = True) -> Iterator[int]:
    """An fd of ``root/rel_dir`` (made if missing) reached without following any link
    below ``root``; ``root`` itself is the admin's choice and may be a link. With
    ``make_root=False`` a missing ``root`` raises FileNotFoundError: an outbox that
    vanished is a share outage, never re-created on the local disk under a lost mount."""
    parts = () if str(rel_dir) in ("", ".") else _plain_parts(rel_dir)
    root = Path(root)
    if create and make_root:
        os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.realpath(root), DIR_FLAGS)
    try:
        shown = root
        for part in parts:
            shown = shown / part
            child = _open_child_dir(fd, part, shown, create)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unique_name_at(dir_fd: int, name: str) -> str:
    if not _exists_at(dir_fd, name):
        return name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        cand = stamped_name(name, n, stamp)
        if not _exists_at(dir_fd, cand):
            return cand
    raise FileExistsError(errno.EEXIST, "no free name", name)


def write_at(dir_fd: int, name: str, data: bytes, mode: int | None = None) -> None:
    """Atomically write ``name`` in the folder ``dir_fd``: an ``O_EXCL|O_NOFOLLOW`` temp,
    fsync, rename over ``name`` (a link there is replaced, never followed), fsync the folder."""
    fd, tmp = create_temp(name, dir_fd=dir_fd)
    try:
        fill_temp(fd, data, mode)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(tmp, dir_fd=dir_fd)
        raise
    fsync_fd_quietly(dir_fd)


def atomic_write_under(root: Path, rel: Path, data: bytes, mode: int | None = None, *,
                       make_root: bool = True) -> Path:
    """Write ``root/rel`` atomically, making its folders (``root`` too unless
    ``make_root=False``); raises ``LinkedPathError`` if any folder below ``root`` is a
    symbolic link. Returns ``root/rel``."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1]), make_root=make_root) as dfd:
        write_at(dfd, parts[-1], data, mode)
    return Path(root, *parts)


def open_under(root: Path, rel: Path) -> BinaryIO:
    """The regular file ``root/rel`` open for reading, reached without following any link
    below ``root`` (``LinkedPathError``); anything but a regular file raises EINVAL."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1]), create=False) as dfd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LinkedPathError(Path(root, *parts)) from None
            raise
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise OSError(errno.EINVAL, "not a regular file", str(Path(root, *parts)))
    return fh


def read_under(root: Path, rel: Path) -> bytes:
    """The bytes of ``root/rel``, opened without following any link below ``root``."""
    with open_under(root, rel) as fh:
        return fh.read()


def unlink_under(root: Path, rel: Path, *,
                 only: tuple[int, int, int, int] | None = None) -> bool:
    """Remove ``root/rel`` (a link there is removed, not followed); False if it was absent.

    ``only`` (st_dev, st_ino, st_size, st_mtime_ns): remove it only while it is that very
    file, so what another writer put there meanwhile stays (False). The check and the
    unlink are two calls; the caller's claim on the source keeps rembgd's own writers
    out of that gap."""
    parts = _plain_parts(rel)
    try:
        with dir_under(root, Path(*parts[:-1]), create=False) as dfd:
            if only is not None:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(only):
                    return False
            os.unlink(parts[-1], dir_fd=dfd)
    except FileNotFoundError:
        return False
    return True


def _copy_in(src: Path, dir_fd: int, name: str, src_dir_fd: int | None = None) -> str:
    """Copy regular file ``src`` (not a link) to a new, unused name in ``dir_fd``."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                  dir_fd=src_dir_fd)
    with os.fdopen(sfd, "rb") as sfh:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        tfd, tmp = create_temp(name, dir_fd=dir_fd)
        try:
            with os.fdopen(tfd, "wb") as tfh:
                shutil.copyfileobj(sfh, tfh, 1 << 20)
                tfh.flush()
                os.fchmod(tfd, stat.S_IMODE(st.st_mode))
                os.utime(tfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(tfd)
            name = _unique_name_at(dir_fd, name)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            unlink_quietly(tmp, dir_fd=dir_fd)
            raise
    return name


def move_under(src: Path, root: Path, rel: Path, *, src_dir_fd: int | None = None,
               make_root: bool = True) -> Path:
    """Move ``src`` (relative to ``src_dir_fd`` if given) to ``root/rel`` (or a free
    stamped name beside it; nothing is overwritten), across file systems too; never
    through a link below ``root``. Returns where it landed."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1]), make_root=make_root) as dfd:
        name = _unique_name_at(dfd, parts[-1])
        try:
            os.rename(src, name, src_dir_fd=src_dir_fd, dst_dir_fd=dfd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            name = _copy_in(Path(src), dfd, name, src_dir_fd)
            os.unlink(src, dir_fd=src_dir_fd)
        fsync_fd_quietly(dfd)
    return Path(root, *parts[:-1], name)


def move_between(src_root: Path, src_rel: Path, root: Path, rel: Path) -> Path:
    """Move the regular file ``src_root/src_rel`` to ``root/rel`` (or a free stamped name
    beside it), never through a link below either root; a missing ``root`` is an error
    (a lost share is never re-created on the local disk). Returns where it landed."""
    src_parts = _plain_parts(src_rel)
    with dir_under(src_root, Path(*src_parts[:-1]), create=False) as sfd:
        st = os.stat(src_parts[-1], dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise LinkedPathError(Path(src_root, *src_parts))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(Path(src_root, *src_parts)))
        return move_under(Path(src_parts[-1]), root, rel, src_dir_fd=sfd, make_root=False)


def write_failure(src: Path, rel: Path, failed_dir: Path, *, reason: str, exc: BaseException,
                  detail: str, move: bool = True) -> Path:
    """Move ``src`` to ``failed_dir/rel`` (keeping subfolders, never through a link) with a
    ``.error.json`` sidecar beside it; returns the sidecar's path."""
    rel = Path(*_plain_parts(rel))
    dest = Path(failed_dir) / rel
    if move and (src.is_file() and not src.is_symlink()):
        dest = move_under(src, failed_dir, rel)
    record = {
        "source": str(src),
        "file": str(dest if move else src),
        "reason": reason,
        "error": detail,
        "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix_time": time.time(),
    }
    sidecar = failure_sidecar(rel.parent / dest.name)
    return atomic_write_under(failed_dir, sidecar, (json.dumps(record, indent=2) + "\n").encode())


def failure_sidecar(rel: Path) -> Path:
    """The ``.error.json`` sidecar of the failed file ``rel`` (even of a 255-byte name)."""
    return Path(rel).parent / fit_name(Path(rel).name, ERROR_SUFFIX)


@dataclass(frozen=True)
class Failure:
    """What a failed/ sidecar says about its file."""

    rel: Path  # the failed file, relative to failed/
    reason: str
    error: str
    unix_time: float


def failure_sidecars(failed_dir: Path) -> Iterator[tuple[float, Path]]:
    """(mtime, path) of every sidecar under ``failed_dir``, never below a hidden folder
    (``.dismissed/``) and never through a link."""
    for folder, dirs, files in os.walk(failed_dir, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.endswith(ERROR_SUFFIX) and not name.startswith("."):
                try:
                    yield os.lstat(os.path.join(folder, name)).st_mtime, Path(folder, name)
                except FileNotFoundError:
                    continue


def read_failure(failed_dir: Path, sidecar: Path) -> Failure | None:
    """The failure a sidecar under ``failed_dir`` describes (None if the sidecar is
    unreadable or names a file that is gone or lies outside ``failed_dir``)."""
    try:
        record = json.loads(read_under(failed_dir, safe_relative(sidecar, failed_dir)))
        rel = safe_relative(Path(record["file"]), failed_dir)
        os.lstat(failed_dir / rel)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Failure(rel, str(record.get("reason", "")), str(record.get("error", "")),
                   float(record.get("unix_time") or 0.0))


def remove_stale_temps(root: Path, older_than_s: float = STALE_TEMP_S, *,
                       now: float | None = None) -> list[Path]:
    """Remove rembgd's own temp files under ``root`` (left by a kill -9 mid-write): this
    host's whose process is gone at once, any other not modified for ``older_than_s``
    (another host may still be writing it); never follows links. Returns what was removed."""
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        return []
    cutoff = (time.time() if now is None else now) - older_than_s
    removed: list[Path] = []
    for folder, _dirs, files, dfd in os.fwalk(real, follow_symlinks=False):
        for name in files:
            if not is_temp_name(name):
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and (st.st_mtime < cutoff or temp_orphaned(name)):
                    os.unlink(name, dir_fd=dfd)
                    removed.append(Path(root) / os.path.relpath(os.path.join(folder, name), real))
            except FileNotFoundError:
                continue  # finished (renamed) or removed meanwhile
    return removed
