"""File-system edge: atomic writes, output naming, safe moves, failed/ sidecars, temp files.

Two families of writers:

* ``atomic_write_bytes`` / ``move_file`` take a whole path and are for folders the
  admin alone controls (the cache, the models, the status file).
* ``atomic_write_under`` / ``move_under`` / ``write_failure`` are for the shared
  outbox, ``failed/`` and ``done/`` folders, which anyone with write access to the
  share can fill with symbolic links. They walk from the configured root folder
  one component at a time with ``O_NOFOLLOW`` and directory fds, so no write ever
  goes through a link: a link below the root raises ``LinkedPathError``. The root
  itself may be a link the admin set up; it is resolved once.

Temp files are ``.<name>.rembgd-tmp.<8 hex>`` in the destination folder (hidden,
so watchers and file browsers skip them), and ``os.replace`` makes the final
name appear complete or not at all. ``is_temp_name`` matches only that exact
pattern (and the previous version's), never a studio's ``photo.rembgd-final.jpg``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".rembgd-tmp."
OUTPUT_SUFFIX = ".png"
ERROR_SUFFIX = ".error.json"
NAME_MAX = 255  # bytes per path component on Linux file systems (ext4, xfs, tmpfs, NFS, SMB)
STALE_TEMP_S = 600.0

_TEMP_RE = re.compile(r"\A\..+\.rembgd-tmp\.[a-z0-9_]{8}\Z", re.S)  # token_hex or mkstemp
# what rembgd before 0.x left behind: mkstemp's 8 characters, or the cross-device move temp
_LEGACY_TEMP_RE = re.compile(r"\A\..+\.rembgd-(?:[a-z0-9_]{8}|move-\d+)\Z", re.S)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# errno values that are worth retrying rather than failing the file for good
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT,
                    errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.EROFS}


class LinkedPathError(OSError):
    """A symbolic link where rembgd would write (errno ELOOP; never transient)."""

    def __init__(self, link: Path):
        super().__init__(errno.ELOOP,
                         f"{link} is a symbolic link; rembgd never writes through links", str(link))
        self.link = Path(link)

    def __str__(self) -> str:
        return self.strerror


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _fsync_fd_quietly(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    try:
        _fsync_fd_quietly(fd)
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


def output_mode(umask: int) -> int:
    return 0o666 & ~umask


def unlink_quietly(path, *, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


# ------------------------------------------------------------------ temp names


def temp_name(name: str) -> str:
    """A fresh hidden temp name for a file that will be renamed to ``name``."""
    return f".{clip_name(name, 80)}{TMP_MARK}{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """Only rembgd's own temp names (this version's and the previous one's)."""
    return bool(_TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name))


def _create_temp(name: str, dir_fd: int | None = None, folder: Path | None = None) -> tuple[int, str]:
    """(fd, temp name) of a new empty temp file for ``name``; never opens an existing file."""
    for _ in range(100):
        tmp = temp_name(name)
        path = tmp if folder is None else str(folder / tmp)
        try:
            return os.open(path, _TEMP_FLAGS, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name", name)


def _fill(fd: int, data: bytes, mode: int | None) -> None:
    """Write ``data`` to the temp ``fd`` (closing it), with its final mode, and fsync it."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fchmod(fh.fileno(), mode if mode is not None else output_mode(current_umask()))
        os.fsync(fh.fileno())


# ------------------------------------------------ writers for admin-owned folders


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    Follows links in ``path``: only for folders the admin controls (see
    ``atomic_write_under`` for the shared ones). ``mode`` defaults to what a plain
    ``open(path, "wb")`` would give (0o666 minus the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = _create_temp(path.name, folder=path.parent)
    tmp = path.parent / name
    try:
        _fill(fd, data, mode)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


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


def _stamped(name: str, n: int, stamp: str) -> str:
    p = Path(name)
    return fit_name(f"{p.stem}.{stamp}-{n}", p.suffix)


def unique_destination(dest: Path) -> Path:
    """``dest`` if free, else ``dest`` with a timestamp counter before the suffix."""
    if not dest.exists():
        return dest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        cand = dest.with_name(_stamped(dest.name, n, stamp))
        if not cand.exists():
            return cand
    raise FileExistsError(dest)


def move_file(src: Path, dest: Path) -> Path:
    """Move without overwriting anything; works across file systems. Follows links in
    ``dest``: only for admin-owned folders (``move_under`` for shared ones)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest = unique_destination(dest)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(temp_name(dest.name))
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            unlink_quietly(tmp)
            raise
        os.unlink(src)
    fsync_dir(dest.parent)
    return dest


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
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
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
    fd = os.open(os.path.realpath(root), _DIR_FLAGS)
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
        cand = _stamped(name, n, stamp)
        if not _exists_at(dir_fd, cand):
            return cand
    raise FileExistsError(errno.EEXIST, "no free name", name)


def write_at(dir_fd: int, name: str, data: bytes, mode: int | None = None) -> None:
    """Atomically write ``name`` in the folder ``dir_fd``: an ``O_EXCL|O_NOFOLLOW`` temp,
    fsync, rename over ``name`` (a link there is replaced, never followed), fsync the folder."""
    fd, tmp = _create_temp(name, dir_fd=dir_fd)
    try:
        _fill(fd, data, mode)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(tmp, dir_fd=dir_fd)
        raise
    _fsync_fd_quietly(dir_fd)


def atomic_write_under(root: Path, rel: Path, data: bytes, mode: int | None = None, *,
                       make_root: bool = True) -> Path:
    """Write ``root/rel`` atomically, making its folders (``root`` too unless
    ``make_root=False``); raises ``LinkedPathError`` if any folder below ``root`` is a
    symbolic link. Returns ``root/rel``."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1]), make_root=make_root) as dfd:
        write_at(dfd, parts[-1], data, mode)
    return Path(root, *parts)


def read_under(root: Path, rel: Path) -> bytes:
    """The bytes of ``root/rel``, opened without following any link below ``root``."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1]), create=False) as dfd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LinkedPathError(Path(root, *parts)) from None
            raise
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(Path(root, *parts)))
        return fh.read()


def unlink_under(root: Path, rel: Path) -> bool:
    """Remove ``root/rel`` (a link there is removed, not followed); False if it was absent."""
    parts = _plain_parts(rel)
    try:
        with dir_under(root, Path(*parts[:-1]), create=False) as dfd:
            os.unlink(parts[-1], dir_fd=dfd)
    except FileNotFoundError:
        return False
    return True


def _copy_in(src: Path, dir_fd: int, name: str) -> str:
    """Copy regular file ``src`` (not a link) to a new, unused name in ``dir_fd``."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(sfd, "rb") as sfh:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        tfd, tmp = _create_temp(name, dir_fd=dir_fd)
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


def move_under(src: Path, root: Path, rel: Path) -> Path:
    """Move ``src`` to ``root/rel`` (or a free stamped name beside it; nothing is
    overwritten), across file systems too; never through a link below ``root``.
    Returns where it landed."""
    parts = _plain_parts(rel)
    with dir_under(root, Path(*parts[:-1])) as dfd:
        name = _unique_name_at(dfd, parts[-1])
        try:
            os.rename(src, name, dst_dir_fd=dfd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            name = _copy_in(Path(src), dfd, name)
            os.unlink(src)
        _fsync_fd_quietly(dfd)
    return Path(root, *parts[:-1], name)


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
    sidecar = rel.parent / fit_name(dest.name, ERROR_SUFFIX)  # even for a 255-byte name
    return atomic_write_under(failed_dir, sidecar, (json.dumps(record, indent=2) + "\n").encode())


def remove_stale_temps(root: Path, older_than_s: float = STALE_TEMP_S, *,
                       now: float | None = None) -> list[Path]:
    """Remove rembgd's own temp files under ``root`` not modified for ``older_than_s``
    (left by a kill -9 mid-write); never follows links. Returns what was removed."""
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
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(name, dir_fd=dfd)
                    removed.append(Path(root) / os.path.relpath(os.path.join(folder, name), real))
            except FileNotFoundError:
                continue  # finished (renamed) or removed meanwhile
    return removed
