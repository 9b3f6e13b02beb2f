"""File-system basics: atomic writes for admin-owned folders, names, temp files, errnos.

``atomic_write_bytes`` takes a whole path and is for folders the
admin alone controls (the cache, the models, the status file). The shared
outbox, ``failed/`` and ``done/`` are written through ``daemon.nofollow``, which
never follows a link.

Temp files are ``.<name>.rembgd-tmp.<host tag>-<pid>-<8 hex>`` in the destination
folder (hidden, so watchers and file browsers skip them), and ``os.replace``
makes the final name appear complete or not at all. The host tag and pid say
who writes it: a temp of this host whose process is gone is an orphan at once
(``temp_orphaned``); another host's waits for the age rule. ``is_temp_name`` matches only that exact
pattern (and the previous version's), never a studio's ``photo.rembgd-final.jpg``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

TMP_MARK = ".rembgd-tmp."
OUTPUT_SUFFIX = ".png"
ERROR_SUFFIX = ".error.json"
NAME_MAX = 255  # bytes per path component on Linux file systems (ext4, xfs, tmpfs, NFS, SMB)
STALE_TEMP_S = 600.0

# [host tag-pid-]token_hex (or mkstemp's 8 characters, before the owner was named)
_TEMP_RE = re.compile(r"\A\..+\.rembgd-tmp\.(?:([0-9a-f]{8})-([0-9]{1,10})-)?[a-z0-9_]{8}\Z", re.S)
# what rembgd before 0.x left behind: mkstemp's 8 characters, or the cross-device move temp
_LEGACY_TEMP_RE = re.compile(r"\A\..+\.rembgd-(?:[a-z0-9_]{8}|move-\d+)\Z", re.S)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# errno values that are worth retrying rather than failing the file for good
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT,
                    errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.EROFS}


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def fsync_fd_quietly(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return
    try:
        fsync_fd_quietly(fd)
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


def host_tag(host: str | None = None) -> str:
    """8 hex digits naming a host in temp names (host names may hold any character)."""
    return hashlib.sha1((host or socket.gethostname()).encode()).hexdigest()[:8]


def temp_name(name: str) -> str:
    """A fresh hidden temp name for a file that will be renamed to ``name``."""
    return f".{clip_name(name, 80)}{TMP_MARK}{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_orphaned(name: str) -> bool:
    """A temp this host wrote whose writing process no longer runs (killed mid-write)."""
    m = _TEMP_RE.match(name)
    if m is None or m.group(1) != host_tag():
        return False
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive (another user's), or not a pid at all
    return False


def is_temp_name(name: str) -> bool:
    """Only rembgd's own temp names (this version's and the previous one's)."""
    return bool(_TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name))


def create_temp(name: str, dir_fd: int | None = None, folder: Path | None = None) -> tuple[int, str]:
    """(fd, temp name) of a new empty temp file for ``name``; never opens an existing file."""
    for _ in range(100):
        tmp = temp_name(name)
        path = tmp if folder is None else str(folder / tmp)
        try:
            return os.open(path, _TEMP_FLAGS, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name", name)


def fill_temp(fd: int, data: bytes, mode: int | None, durable: bool = True) -> None:
    """Write ``data`` to the temp ``fd`` (closing it), with its final mode, and fsync it
    (``durable``)."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fchmod(fh.fileno(), mode if mode is not None else output_mode(current_umask()))
        if durable:
            os.fsync(fh.fileno())


# ------------------------------------------------ writers for admin-owned folders


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, *,
                       durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    Follows links in ``path``: only for folders the admin controls (see
    ``atomic_write_under`` for the shared ones). ``mode`` defaults to what a plain
    ``open(path, "wb")`` would give (0o666 minus the umask), not mkstemp's 0o600.
    ``durable`` False skips both fsyncs (~5-7 ms a file here): a crash may then leave
    the file empty or torn, so only for data whose every read is verified.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = create_temp(path.name, folder=path.parent)
    tmp = path.parent / name
    try:
        fill_temp(fd, data, mode, durable)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable:
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


def stamped_name(name: str, n: int, stamp: str) -> str:
    p = Path(name)
    return fit_name(f"{p.stem}.{stamp}-{n}", p.suffix)
