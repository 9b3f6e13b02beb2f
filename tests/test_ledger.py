"""The source ledger: changed files (newer or older) are redone, unchanged ones never."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from daemon.imaging.png import encode_png
from daemon.imaging.stamp import stamp
from daemon.ledger import LEDGER_DIR, Ledger, adopted_mark, record_name
from daemon.nofollow import LinkedPathError


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
    assert ledger.get(REL).sha256 == sha(b"photo one")  # the record is of the old photo


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
    assert ledger.get(REL).sha256 == sha(b"photo AAA")


def test_a_touch_is_changed_and_done_once_recorded_again(dirs):
    """A touch is redone (cheap: the cache's exact tier); the job's record makes it done."""
    inbox, outbox = dirs
    ledger = Ledger(outbox)
    ledger.record(REL, _put(inbox / REL, b"photo one", T0), sha(b"photo one"), [])
    os.utime(inbox / REL, ns=(T0 + 5 * 10**9, T0 + 5 * 10**9))
    st = (inbox / REL).stat()
    assert ledger.state(REL, st) == "changed"
    ledger.record(REL, st, sha(b"photo one"), [])  # what the redo's job writes
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


def _png(data: bytes | None = None) -> bytes:
    """A real PNG output; stamped with ``data``'s sha256 when given."""
    out = encode_png(np.full((8, 8, 4), 200, np.uint8))
    return out if data is None else stamp(out, "png", sha(data))


def test_legacy_outputs_are_adopted_by_the_old_rule_only_on_upgrade(dirs):
    inbox, outbox = dirs
    mark = adopted_mark(inbox.parent / "state", outbox)
    ledger = Ledger(outbox, adopted_mark=mark)
    st = _put(inbox / REL, b"photo one", T0)
    out = Path("shoot/a.jpg.png")
    assert not ledger.vouch(REL, st, inbox / REL, [out])  # no output: process it
    (outbox / "shoot").mkdir()
    _put(outbox / out, _png(), T0 - 10**9)
    assert not ledger.vouch(REL, st, inbox / REL, [out])  # an output older than the source
    os.utime(outbox / out, ns=(T0 + 10**9, T0 + 10**9))
    assert ledger.vouch(REL, st, inbox / REL, [out])
    assert ledger.state(REL, st) == "done" and ledger.get(REL).legacy
    # after adoption, a replacement with an older mtime is seen, and the hash cannot vouch
    (inbox / REL).unlink()
    st2 = _put(inbox / REL, b"photo two", T0 - 10**12)
    assert ledger.state(REL, st2) == "changed"
    assert ledger.get(REL).sha256 is None  # an adopted record: no hash ever vouches for it
    # the upgrade's scan is over: with the record lost, an mtime vouches for nothing
    ledger.close_adoption()
    shutil.rmtree(outbox / LEDGER_DIR)
    again = Ledger(outbox, adopted_mark=mark)  # a restart
    assert not again.adoption_open() and mark.is_file()
    assert not again.vouch(REL, st2, inbox / REL, [out])
    assert not Ledger(outbox).adoption_open()  # a ledger opened only to be read adopts nothing


def test_without_a_record_the_output_stamp_decides(dirs):
    inbox, outbox = dirs
    ledger = Ledger(outbox, adopted_mark=adopted_mark(inbox.parent / "state", outbox))
    out = Path("shoot/a.jpg.png")
    (outbox / "shoot").mkdir()
    st = _put(inbox / REL, b"photo one", T0)
    _put(outbox / out, _png(b"photo one"), T0 + 10**9)
    assert ledger.vouch(REL, st, inbox / REL, [out])  # the ledger was lost: content decides
    rec = ledger.get(REL)
    assert rec.sha256 == sha(b"photo one") and not rec.legacy and ledger.state(REL, st) == "done"
    # rsync -a of another photo, 4 days older than the output, with the record lost or torn
    (inbox / REL).unlink()
    st2 = _put(inbox / REL, b"photo two", T0 - 4 * 86400 * 10**9)
    for damage in ("lost", "torn"):
        if damage == "lost":
            shutil.rmtree(outbox / LEDGER_DIR)
        else:
            ledger.record(REL, st, sha(b"photo one"), [out])
            (outbox / record_name(REL)).write_text("garbage")
        assert ledger.state(REL, st2) == "unknown"
        assert not ledger.vouch(REL, st2, inbox / REL, [out]), damage
        assert ledger.get(REL) is None  # never rewritten as legacy
    # a torn record with an unstamped (pre-stamp) output is no upgrade either
    _put(outbox / out, _png(), T0 + 10**9)
    assert ledger.adoption_open() and not ledger.vouch(REL, st2, inbox / REL, [out])
    # every output must carry the stamp
    other = Path("web/shoot/a.jpg.webp")
    (outbox / "web/shoot").mkdir(parents=True)
    _put(outbox / out, _png(b"photo two"), T0)
    _put(outbox / other, b"RIFF\x04\x00\x00\x00WEBP", T0)
    assert not ledger.vouch(REL, st2, inbox / REL, [out, other])
    assert ledger.vouch(REL, st2, inbox / REL, [out])


def test_a_tiff_output_vouches_and_an_unreadable_stamp_is_no_stamp(dirs, monkeypatch):
    """Issue 28.1: the rescan reads a TIFF's stamp through the fd-backed open; a reader
    that fails on an output makes it "no stamp" (the source is redone), never an error."""
    import structlog

    from daemon import ledger as ledgermod
    from daemon.config.schema import Deliverable
    from daemon.imaging.deliver import render
    from daemon.imaging.meta import SourceMeta

    inbox, outbox = dirs
    ledger = Ledger(outbox, adopted_mark=adopted_mark(inbox.parent / "state", outbox))
    out = Path("master/shoot/a.jpg.tif")
    (outbox / "master/shoot").mkdir(parents=True)
    st = _put(inbox / REL, b"photo one", T0)
    tiff = render(np.full((16, 16, 3), 90, np.uint8), np.full((16, 16), 255, np.uint8),
                  Deliverable("master", "tiff"), SourceMeta())
    _put(outbox / out, stamp(tiff, "tiff", sha(b"photo one")), T0 + 10**9)
    assert ledger.vouch(REL, st, inbox / REL, [out])
    shutil.rmtree(outbox / LEDGER_DIR)
    ledger.close_adoption()  # after the upgrade: an output without a stamp never vouches

    def broken(_fh):
        raise TypeError("a reader's bug")

    monkeypatch.setattr(ledgermod, "read_stamp", broken)
    with structlog.testing.capture_logs() as logs:
        assert not ledger.vouch(REL, st, inbox / REL, [out])  # redone, not raised
    assert [e for e in logs if e["event"] == "output_stamp_unreadable"], logs
