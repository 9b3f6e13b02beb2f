"""fsutil: atomic writes, the output naming rule, safe relative paths, failed/ sidecars."""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from daemon import fsutil
from daemon.imaging.decode import TruncatedImage
from daemon.fsutil import (atomic_write_bytes, is_temp_name, output_name,
                           safe_relative)
from daemon import nofollow
from daemon.nofollow import move_under, write_failure
from daemon.scan import is_ignored, walk


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temp_name(p.name))


# ------------------------------------------------------------------ atomic write


def test_atomic_write_creates_folders_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "out.png"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_atomic_write_replaces_existing(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_atomic_write_mode(tmp_path):
    atomic_write_bytes(tmp_path / "x", b"1", mode=0o640)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o640


def test_atomic_write_default_mode_follows_umask(tmp_path):
    """Not mkstemp's private 0600: a failed/ sidecar or status file must be readable."""
    old = os.umask(0o027)
    try:
        assert fsutil.current_umask() == 0o027
        atomic_write_bytes(tmp_path / "y", b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "y").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("existing", [None, b"previous complete file"])
def test_failed_rename_leaves_no_temp_and_no_partial(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.png"
    if existing is not None:
        target.write_bytes(existing)

    def boom(src, dst):
        assert Path(src).read_bytes() == b"x" * 100_000  # the temp is complete by now
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 100_000)
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path) == []
    if existing is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == existing


def test_failed_fsync_leaves_no_temp(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fsutil.os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "out.png", b"data")
    assert list(tmp_path.iterdir()) == []


def test_cache_blobs_skip_fsync_and_a_torn_blob_reads_as_absent(tmp_path, monkeypatch):
    """A cache blob is written atomically but never waits for the disk; what a crash can
    then leave (an empty or torn file) reads as absent, and the next put repairs it."""
    from daemon.cache.blobs import BlobDir

    def no_fsync(fd):
        raise AssertionError("a cache blob write waited for fsync")

    monkeypatch.setattr(fsutil.os, "fsync", no_fsync)
    blobs = BlobDir(tmp_path / "blobs")
    digest = blobs.put(b"mask bytes")
    assert blobs.get(digest) == b"mask bytes"
    blobs.path(digest).write_bytes(b"")  # torn by a crash before the data reached the disk
    assert blobs.get(digest) is None
    assert blobs.put(b"mask bytes") == digest and blobs.get(digest) == b"mask bytes"
    with pytest.raises(AssertionError):  # every other atomic write still fsyncs
        atomic_write_bytes(tmp_path / "out.png", b"data")


def test_interrupt_during_write_leaves_no_temp(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class Exploding:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # SIGINT half-way

    monkeypatch.setattr(fsutil.os, "fdopen", lambda fd, mode: Exploding(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "out.png", b"y" * 10_000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            atomic_write_bytes(folder / "out.png", b"data")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_target_is_a_folder(tmp_path):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "out.png", b"data")
    assert _leftovers(tmp_path) == []


def test_readers_never_see_a_partial_file(tmp_path):
    """A concurrent reader sees the old or the new content, whole, every time."""
    target = tmp_path / "out.png"
    blobs = [bytes([i]) * 1_500_000 for i in (65, 66)]
    atomic_write_bytes(target, blobs[0])
    stop = threading.Event()
    bad: list[int] = []

    def reader():
        while not stop.is_set():
            data = target.read_bytes()
            if data not in blobs:
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            atomic_write_bytes(target, blobs[i % 2])
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert _leftovers(tmp_path) == []


def test_temp_names_are_hidden_and_ignored(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", spy)
    atomic_write_bytes(tmp_path / "photo.jpg.png", b"1")
    (name,) = seen
    assert name.startswith(".photo.jpg.png") and is_temp_name(name)
    assert is_ignored(name, ())  # the watcher never picks up our own temp files


# ----------------------------------------------------------------- naming rule


@pytest.mark.parametrize("rel,out", [
    ("a.jpg", "a.jpg.png"),
    ("a.png", "a.png.png"),
    ("a.JPEG", "a.JPEG.png"),
    ("shoot 12/IMG 0001.tif", "shoot 12/IMG 0001.tif.png"),
    ("noext", "noext.png"),
    ("déjà vu/été.webp", "déjà vu/été.webp.png"),
])
def test_output_name(rel, out):
    assert output_name(Path(rel)) == Path(out)


def test_output_name_never_collides_for_one_stem():
    names = ["a.jpg", "a.png", "a.jpeg", "a.JPG", "a", "a.png.png"]
    outs = {output_name(Path(n)) for n in names}
    assert len(outs) == len(names)


# ---------------------------------------------------------------- safe_relative


def test_safe_relative_inside(tmp_path):
    assert safe_relative(tmp_path / "in" / "x" / "a.jpg", tmp_path / "in") == Path("x/a.jpg")
    assert safe_relative(tmp_path / "in" / "..a.jpg", tmp_path / "in") == Path("..a.jpg")


@pytest.mark.parametrize("path", ["../etc/passwd", "x/../../y", ".", "", "../in2/a.jpg"])
def test_safe_relative_refuses_escapes(tmp_path, path):
    root = tmp_path / "in"
    with pytest.raises(ValueError, match="outside"):
        safe_relative(root / path if path else root, root)


def test_safe_relative_refuses_other_absolute_paths(tmp_path):
    with pytest.raises(ValueError):
        safe_relative(Path("/etc/passwd"), tmp_path / "in")
    with pytest.raises(ValueError):
        safe_relative(tmp_path / "inbox-other" / "a.jpg", tmp_path / "inbox")


# --------------------------------------------------------------- write_failure


def _failure(tmp_path: Path, rel: str, content: bytes = b"broken"):
    inbox, failed = tmp_path / "in", tmp_path / "failed"
    src = inbox / rel
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(content)
    try:
        raise TruncatedImage("truncated or incomplete image data: image file is truncated")
    except TruncatedImage as exc:
        err = exc
    before = time.time()
    sidecar = write_failure(src, Path(rel), failed, reason="truncated", exc=err, detail=str(err))
    return src, failed, sidecar, before


def test_write_failure_moves_and_records(tmp_path):
    src, failed, sidecar, before = _failure(tmp_path, "shoot/day 1/IMG_1.jpg")
    moved = failed / "shoot" / "day 1" / "IMG_1.jpg"
    assert not src.exists() and moved.read_bytes() == b"broken"
    assert sidecar == failed / "shoot" / "day 1" / "IMG_1.jpg.error.json"
    record = json.loads(sidecar.read_text())
    assert record["reason"] == "truncated"
    assert record["exception"] == "daemon.imaging.decode.TruncatedImage"
    assert "truncated" in record["error"]
    assert record["source"] == str(src) and record["file"] == str(moved)
    assert before - 1 <= record["unix_time"] <= time.time() + 1
    stamp = time.strptime(record["time"][:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(stamp) - record["unix_time"]) < 2
    assert sorted(p.name for p in moved.parent.iterdir()) == ["IMG_1.jpg", "IMG_1.jpg.error.json"]
    assert sidecar.stat().st_mode & 0o044  # readable by the studio, not 0600


def test_write_failure_never_overwrites_an_earlier_failure(tmp_path):
    _, failed, first, _ = _failure(tmp_path, "sub/a.jpg", b"first")
    _, _, second, _ = _failure(tmp_path, "sub/a.jpg", b"second")
    assert first != second
    assert (failed / "sub" / "a.jpg").read_bytes() == b"first"
    moved = Path(json.loads(second.read_text())["file"])
    assert moved.read_bytes() == b"second" and moved.parent == failed / "sub"
    assert second == moved.with_name(moved.name + ".error.json")


def test_write_failure_without_move(tmp_path):
    src = tmp_path / "in" / "a.jpg"
    src.parent.mkdir()
    src.write_bytes(b"x")
    sidecar = write_failure(src, Path("a.jpg"), tmp_path / "failed", reason="unsupported",
                            exc=ValueError("nope"), detail="nope", move=False)
    assert src.exists()
    record = json.loads(sidecar.read_text())
    assert record["file"] == str(src) and record["exception"] == "builtins.ValueError"


def test_move_across_file_systems(tmp_path, monkeypatch):
    src = tmp_path / "in" / "a.jpg"
    src.parent.mkdir()
    src.write_bytes(b"payload")

    def exdev(a, b, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(nofollow.os, "rename", exdev)
    dest = move_under(src, tmp_path / "done", Path("x/a.jpg"))
    assert dest == tmp_path / "done" / "x" / "a.jpg"
    assert dest.read_bytes() == b"payload" and not src.exists()
    assert _leftovers(dest.parent) == []


def test_failed_cross_device_copy_leaves_no_temp_and_keeps_source(tmp_path, monkeypatch):
    src = tmp_path / "in" / "a.jpg"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    monkeypatch.setattr(nofollow.os, "rename",
                        lambda a, b, **kw: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))

    def half_copy(fsrc, fdst, *a):
        fdst.write(b"pay")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nofollow.shutil, "copyfileobj", half_copy)
    with pytest.raises(OSError):
        move_under(src, tmp_path / "done", Path("a.jpg"))
    assert src.read_bytes() == b"payload"
    assert list((tmp_path / "done").iterdir()) == []


def test_scan_skips_temp_and_clutter(tmp_path):
    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png", ".a.jpg.png.rembgd-x1y2", "._a.jpg", ".DS_Store",
                 "Thumbs.db", "c.jpg.part", "sub/d.tmp"):
        (inbox / name).write_bytes(b"x")
    from daemon.config import DEFAULT_IGNORE

    assert [str(rel) for _, rel in walk(inbox, True, DEFAULT_IGNORE)] == ["a.jpg", "sub/b.png"]
