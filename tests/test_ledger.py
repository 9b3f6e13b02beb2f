"""The source ledger: changed files (newer or older) are redone, unchanged ones never."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from daemon.nofollow import LinkedPathError
from daemon.ledger import LEDGER_DIR, Ledger, record_name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "inbox" / "shoot").mkdir(parents=True)
    (tmp_path / "outbox").mkdir()
    return tmp_path / "inbox", tmp_path / "outbox"


def _put(path: Path, data: bytes, mtime_ns: int | None = None) -> os.stat_result:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path.stat()


REL = Path("shoot/a.jpg")
T0 = 1_700_000_000_000_000_000


def test_unchanged_is_done_even_after_a_restart(dirs):
    inbox, outbox = dirs
    st = _put(inbox / REL, b"photo one", T0)
    assert Ledger(outbox).state(REL, st) == "unknown"
    Ledger(outbox).record(REL, st, sha(b"photo one"), [Path("shoot/a.jpg.png")])
    again = Ledger(outbox)  # a new process
    assert again.state(REL, (inbox / REL).stat()) == "done"
    rec = again.get(REL)
    assert rec.outputs == ("shoot/a.jpg.png",) and rec.sha256 == sha(b"photo one")
    files = [p.relative_to(outbox) for p in (outbox / LEDGER_DIR).rglob("*") if p.is_file()]
    assert files == [record_name(REL)]


def test_replaced_by_a_photo_with_an_older_mtime_is_changed(dirs):
    """rsync -a / cp -p keep the sender's mtime, which may be older than the output."""
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    ledger.record(REL, _put(inbox / REL, b"photo one", T0), sha(b"photo one"), [])
    staged = inbox / "shoot" / ".a.jpg.XyZ123"  # rsync's temp, renamed over the file
    _put(staged, b"photo two", T0 - 86_400 * 10**9)
    os.replace(staged, inbox / REL)
    st = (inbox / REL).stat()
    assert ledger.state(REL, st) == "changed"
    assert not ledger.same_content(REL, sha(b"photo two"))


def test_rewritten_in_place_with_same_size_and_old_mtime_is_changed(dirs):
    """cp -p over an existing file: same inode, same size, mtime put back; ctime tells."""
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    st0 = _put(inbox / REL, b"photo AAA", T0)
    ledger.record(REL, st0, sha(b"photo AAA"), [])
    with open(inbox / REL, "r+b") as fh:
        fh.write(b"photo BBB")
    os.utime(inbox / REL, ns=(T0, T0))
    st = (inbox / REL).stat()
    assert (st.st_ino, st.st_size, st.st_mtime_ns) == (st0.st_ino, st0.st_size, st0.st_mtime_ns)
    assert ledger.state(REL, st) == "changed"
    assert not ledger.same_content(REL, sha(b"photo BBB"))


def test_touch_without_a_content_change_is_confirmed_by_hash(dirs):
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    ledger.record(REL, _put(inbox / REL, b"photo one", T0), sha(b"photo one"), [])
    os.utime(inbox / REL, ns=(T0 + 5 * 10**9, T0 + 5 * 10**9))
    st = (inbox / REL).stat()
    assert ledger.state(REL, st) == "changed"
    assert ledger.same_content(REL, sha(b"photo one"))
    ledger.record(REL, st, sha(b"photo one"), [])  # the caller refreshes the record
    assert ledger.state(REL, st) == "done"


def test_other_paths_are_unknown(dirs):
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    st = _put(inbox / REL, b"x", T0)
    ledger.record(REL, st, sha(b"x"), [])
    other = Path("shoot/b.jpg")
    assert ledger.state(other, _put(inbox / other, b"x", T0)) == "unknown"


def test_a_record_from_another_host_ignores_the_device_number(dirs):
    inbox, outbox = dirs
    st = _put(inbox / REL, b"x", T0)
    Ledger(outbox, host="studio-a").record(REL, st, sha(b"x"), [])
    path = outbox / record_name(REL)
    raw = json.loads(path.read_text())
    raw["dev"] = st.st_dev + 7  # NFS clients number the same mount differently
    path.write_text(json.dumps(raw))
    assert Ledger(outbox, host="studio-b").state(REL, st) == "done"
    assert Ledger(outbox, host="studio-a").state(REL, st) == "changed"


def test_torn_or_linked_records_vouch_for_nothing(dirs, tmp_path):
    inbox, outbox = dirs
    st = _put(inbox / REL, b"x", T0)
    ledger = Ledger(outbox)
    ledger.record(REL, st, sha(b"x"), [])
    (outbox / record_name(REL)).write_text('{"rel": "shoot/a.jpg", "si')
    assert ledger.state(REL, st) == "unknown"
    # a planted record reached through a link is not read, and not written through
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ledger.record(REL, st, sha(b"x"), [])
    shutil.move(outbox / LEDGER_DIR, elsewhere / LEDGER_DIR)
    (outbox / LEDGER_DIR).symlink_to(elsewhere / LEDGER_DIR)
    assert (outbox / record_name(REL)).is_file()  # reachable by a plain open, not by the ledger
    assert ledger.state(REL, st) == "unknown"
    with pytest.raises(LinkedPathError):
        ledger.record(Path("c.jpg"), st, sha(b"x"), [])
    assert [p.name for p in (elsewhere / LEDGER_DIR).rglob("*.json")] == [record_name(REL).name]


def test_undecodable_names_get_records(dirs):
    inbox, outbox = dirs
    rel = Path(os.fsdecode(b"caf\xe9.jpg"))
    st = _put(inbox / rel, b"x", T0)
    Ledger(outbox).record(rel, st, sha(b"x"), [Path(str(rel) + ".png")])
    assert Ledger(outbox).state(rel, st) == "done"


def test_legacy_outputs_are_adopted_by_the_old_rule_once(dirs):
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    st = _put(inbox / REL, b"photo one", T0)
    out = Path("shoot/a.jpg.png")
    assert not ledger.adopt_legacy(REL, st, out)  # no output: process it
    (outbox / "shoot").mkdir()
    _put(outbox / out, b"png", T0 - 10**9)
    assert not ledger.adopt_legacy(REL, st, out)  # an output older than the source
    os.utime(outbox / out, ns=(T0 + 10**9, T0 + 10**9))
    assert ledger.adopt_legacy(REL, st, out)
    assert ledger.state(REL, st) == "done" and ledger.get(REL).legacy
    # after adoption, a replacement with an older mtime is seen, and the hash cannot vouch
    (inbox / REL).unlink()
    st2 = _put(inbox / REL, b"photo two", T0 - 10**12)
    assert ledger.state(REL, st2) == "changed"
    assert not ledger.same_content(REL, sha(b"photo one"))
