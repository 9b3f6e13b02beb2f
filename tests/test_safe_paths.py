"""Link-proof writes under the shared outbox, failed/ and done/ folders; temp names; stale temps."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from daemon.config import DEFAULT_IGNORE
from daemon.fsutil import is_temp_name, is_transient, temp_name
from daemon.nofollow import (LinkedPathError, atomic_write_under, move_under, read_under,
                             remove_stale_temps, unlink_under, write_failure)
from daemon.scan import ignore_reason, is_ignored, path_ignore_reason, walk


@pytest.fixture
def tree(tmp_path):
    """inbox/, outbox/, failed/, done/ and elsewhere/ (where nothing may ever land)."""
    for name in ("inbox", "outbox", "failed", "done", "elsewhere"):
        (tmp_path / name).mkdir()
    return tmp_path


def _everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _drop(tree: Path, rel: str, data: bytes = b"photo") -> Path:
    src = tree / "inbox" / rel
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    return src


# ---------------------------------------------------------------------- outbox


def test_output_through_a_linked_subfolder_is_refused(tree):
    (tree / "outbox" / "sub").symlink_to(tree / "elsewhere")
    with pytest.raises(LinkedPathError) as info:
        atomic_write_under(tree / "outbox", Path("sub/x.jpg.png"), b"cutout")
    assert str(info.value) == (f"{tree / 'outbox' / 'sub'} is a symbolic link; "
                               "rembgd never writes through links")
    assert info.value.errno == errno.ELOOP and not is_transient(info.value)
    assert _everything(tree / "elsewhere") == []


def test_a_link_deeper_down_or_dangling_is_refused(tree):
    (tree / "outbox" / "a").mkdir()
    (tree / "outbox" / "a" / "b").symlink_to(tree / "elsewhere")
    with pytest.raises(LinkedPathError, match="outbox/a/b is a symbolic link"):
        atomic_write_under(tree / "outbox", Path("a/b/c/x.png"), b"cutout")
    (tree / "outbox" / "d").symlink_to(tree / "elsewhere" / "not-yet")
    with pytest.raises(LinkedPathError, match="outbox/d is a symbolic link"):
        atomic_write_under(tree / "outbox", Path("d/x.png"), b"cutout")
    assert _everything(tree / "elsewhere") == []


def test_a_link_at_the_output_name_is_replaced_not_followed(tree):
    victim = tree / "elsewhere" / "victim"
    victim.write_bytes(b"precious")
    (tree / "outbox" / "x.jpg.png").symlink_to(victim)
    out = atomic_write_under(tree / "outbox", Path("x.jpg.png"), b"cutout")
    assert out == tree / "outbox" / "x.jpg.png"
    assert not out.is_symlink() and out.read_bytes() == b"cutout"
    assert victim.read_bytes() == b"precious"


def test_folders_are_made_and_no_temp_is_left(tree):
    out = atomic_write_under(tree / "outbox", Path("shoot 1/day 2/a.jpg.png"), b"x" * 1000, mode=0o640)
    assert out.read_bytes() == b"x" * 1000 and out.stat().st_mode & 0o777 == 0o640
    assert _everything(tree / "outbox") == ["shoot 1", "shoot 1/day 2", "shoot 1/day 2/a.jpg.png"]


def test_the_configured_root_may_itself_be_a_link(tree):
    (tree / "outbox-link").symlink_to(tree / "outbox")
    atomic_write_under(tree / "outbox-link", Path("sub/a.png"), b"1")
    assert (tree / "outbox" / "sub" / "a.png").read_bytes() == b"1"


def test_a_folder_at_the_output_name_fails_cleanly(tree):
    (tree / "outbox" / "x.png").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_under(tree / "outbox", Path("x.png"), b"1")
    assert _everything(tree / "outbox") == ["x.png"]


def test_a_file_where_a_folder_should_be(tree):
    (tree / "outbox" / "sub").write_bytes(b"file")
    with pytest.raises(NotADirectoryError):
        atomic_write_under(tree / "outbox", Path("sub/x.png"), b"1")


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/x.png"])
def test_escaping_relative_paths_are_refused(tree, rel):
    with pytest.raises(ValueError, match="not a plain relative path"):
        atomic_write_under(tree / "outbox", Path(rel), b"1")


def test_read_and_unlink_under_refuse_links(tree):
    atomic_write_under(tree / "outbox", Path("d/r.json"), b"{}")
    assert read_under(tree / "outbox", Path("d/r.json")) == b"{}"
    (tree / "elsewhere" / "secret").write_bytes(b"secret")
    (tree / "outbox" / "d" / "l.json").symlink_to(tree / "elsewhere" / "secret")
    with pytest.raises(LinkedPathError):
        read_under(tree / "outbox", Path("d/l.json"))
    assert unlink_under(tree / "outbox", Path("d/l.json"))  # the link goes, its target stays
    assert (tree / "elsewhere" / "secret").exists()
    assert not unlink_under(tree / "outbox", Path("d/l.json"))


# --------------------------------------------------------------------- failed/


def test_failure_through_a_linked_subfolder_is_refused(tree):
    src = _drop(tree, "sub/x.jpg", b"broken")
    (tree / "failed" / "sub").symlink_to(tree / "elsewhere")
    with pytest.raises(LinkedPathError, match="failed/sub is a symbolic link"):
        write_failure(src, Path("sub/x.jpg"), tree / "failed", reason="truncated",
                      exc=ValueError("x"), detail="x")
    assert src.read_bytes() == b"broken"  # stays in the inbox
    assert _everything(tree / "elsewhere") == []


def test_failure_sidecar_never_follows_a_link_at_its_name(tree):
    src = _drop(tree, "x.jpg", b"broken")
    victim = tree / "elsewhere" / "victim"
    victim.write_bytes(b"precious")
    (tree / "failed" / "x.jpg.error.json").symlink_to(victim)
    sidecar = write_failure(src, Path("x.jpg"), tree / "failed", reason="truncated",
                            exc=ValueError("x"), detail="x")
    assert sidecar == tree / "failed" / "x.jpg.error.json" and not sidecar.is_symlink()
    assert json.loads(sidecar.read_text())["reason"] == "truncated"
    assert victim.read_bytes() == b"precious"
    assert (tree / "failed" / "x.jpg").read_bytes() == b"broken"


# ----------------------------------------------------------------------- done/


def test_done_through_a_linked_subfolder_is_refused(tree):
    src = _drop(tree, "sub/a.jpg")
    (tree / "done" / "sub").symlink_to(tree / "elsewhere")
    with pytest.raises(LinkedPathError, match="done/sub is a symbolic link"):
        move_under(src, tree / "done", Path("sub/a.jpg"))
    assert src.exists() and _everything(tree / "elsewhere") == []


def test_move_never_overwrites(tree):
    (tree / "done" / "sub").mkdir()
    (tree / "done" / "sub" / "a.jpg").write_bytes(b"first")
    src = _drop(tree, "sub/a.jpg", b"second")
    dest = move_under(src, tree / "done", Path("sub/a.jpg"))
    assert dest.parent == tree / "done" / "sub" and dest.name != "a.jpg"
    assert dest.name.startswith("a.") and dest.suffix == ".jpg"
    assert dest.read_bytes() == b"second" and not src.exists()
    assert (tree / "done" / "sub" / "a.jpg").read_bytes() == b"first"


def test_a_link_at_the_done_name_is_kept_and_not_followed(tree):
    victim = tree / "elsewhere" / "victim"
    victim.write_bytes(b"precious")
    (tree / "done" / "a.jpg").symlink_to(victim)
    dest = move_under(_drop(tree, "a.jpg", b"photo"), tree / "done", Path("a.jpg"))
    assert dest.name != "a.jpg" and dest.read_bytes() == b"photo"
    assert victim.read_bytes() == b"precious"


def test_move_across_real_file_systems(tree):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tree.stat().st_dev:
        pytest.skip("no second file system to move across")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = Path(other) / "a.jpg"
        src.write_bytes(b"payload" * 1000)
        os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
        src.chmod(0o640)
        dest = move_under(src, tree / "done", Path("x/a.jpg"))
        assert not src.exists()
    assert dest == tree / "done" / "x" / "a.jpg" and dest.read_bytes() == b"payload" * 1000
    st = dest.stat()
    assert st.st_mtime_ns == 1_600_000_000_123_456_789 and st.st_mode & 0o777 == 0o640
    assert _everything(tree / "done") == ["x", "x/a.jpg"]


# ------------------------------------------------------------------ temp names


def test_temp_names_match_only_the_exact_pattern():
    t = temp_name("photo.jpg.png")
    assert t.startswith(".photo.jpg.png.rembgd-tmp.") and is_temp_name(t)
    assert len(os.fsencode(temp_name("é" * 200))) < 255
    assert is_temp_name(".a.jpg.png.rembgd-ab12cd_9")  # the previous version's leftovers
    for real in ("photo.rembgd-final.jpg", "photo.rembgd-tmp.jpg", "x.rembgd-tmp.0123abcd",
                 "photo.rembgd-12345678", ".rembgd-tmp.0123abcd", "a.jpg"):
        assert not is_temp_name(real), real


def test_real_names_with_rembgd_in_them_are_work(tree):
    for name in ("photo.rembgd-final.jpg", "sub/b.rembgd-v2.png", temp_name("c.jpg.png")):
        _drop(tree, name)
    got = [str(rel) for _, rel in walk(tree / "inbox", True, DEFAULT_IGNORE)]
    assert got == ["photo.rembgd-final.jpg", "sub/b.rembgd-v2.png"]
    assert not is_ignored("photo.rembgd-final.jpg", ())
    assert is_ignored(temp_name("c.jpg.png"), ())  # our temps, even with no ignore patterns


def test_ignore_reason_says_why():
    assert ignore_reason("a.jpg", DEFAULT_IGNORE) is None
    assert ignore_reason(temp_name("a.png"), ()) == "a rembgd temp file"
    assert ignore_reason("THUMBS.DB", DEFAULT_IGNORE) == "matches the ignore pattern 'Thumbs.db'"
    assert ignore_reason("c.jpg.part", DEFAULT_IGNORE) == "matches the ignore pattern '*.part'"
    assert path_ignore_reason(Path(".git/x/a.jpg"), DEFAULT_IGNORE) == \
        "folder .git: matches the ignore pattern '.*'"
    assert path_ignore_reason(Path("x/a.tmp"), DEFAULT_IGNORE) == \
        "its name: matches the ignore pattern '*.tmp'"
    assert path_ignore_reason(Path("x/a.jpg"), DEFAULT_IGNORE) is None


# ----------------------------------------------------------------- stale temps


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_remove_stale_temps(tree):
    out = tree / "outbox"
    (out / "sub").mkdir()
    old = [out / temp_name("a.jpg.png"), out / "sub" / temp_name("b.jpg.png"),
           out / ".c.jpg.png.rembgd-x1y2z3w4"]  # the previous version's
    fresh = out / temp_name("d.jpg.png")  # a write in progress
    real = [out / "photo.rembgd-final.jpg.png", out / "sub" / "e.jpg.png"]
    outside = tree / "elsewhere" / temp_name("f.jpg.png")  # reachable only through a link
    for p in old + [fresh] + real + [outside]:
        p.write_bytes(b"x" * 100)
    for p in old + real + [outside]:
        _age(p, 3600)
    (out / "linked").symlink_to(tree / "elsewhere")
    removed = remove_stale_temps(out, older_than_s=600)
    assert sorted(removed) == sorted(old)
    assert not any(p.exists() for p in old)
    assert fresh.exists() and outside.exists() and all(p.exists() for p in real)
    assert remove_stale_temps(tree / "missing") == []


def test_remove_stale_temps_through_a_linked_root(tree):
    (tree / "outbox-link").symlink_to(tree / "outbox")
    tmp = tree / "outbox" / temp_name("a.png")
    tmp.write_bytes(b"x")
    _age(tmp, 3600)
    assert remove_stale_temps(tree / "outbox-link") == [tree / "outbox-link" / tmp.name]
    assert not tmp.exists()
