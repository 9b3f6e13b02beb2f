"""Issue 15's NAS and sync-tool cases, end to end, one regression test per defect.

Each test runs a real ``rembgd run`` process (``harness.Daemon``) on real files
in a temp inbox/outbox and watches only what a studio would see: the files in
the outbox, ``failed/`` and ``done/``, the JSON log and ``rembgd status``. Two
things a real process cannot show are checked on an in-process ``Supervisor``:
the ONNX thread count a reload applies, and an outbox that vanishes in the instant
between the standby check and the writes.

Defect -> test:

1. replaced input with an older mtime (rsync -a, cp -p) -> ``test_replaced_*``
2. held-open / paused / touched-then-copied files -> ``test_incomplete_files_*``
3. symlinked subfolders in outbox, failed/, done/ -> ``test_symlinked_subfolders_*``
4, 10. reload: unprovisioned model, workers, logging.level, threads -> ``test_reload_*``
5. temp files orphaned by kill -9 -> ``test_stale_temp_files_*``
6. a real name containing ``.rembgd-`` -> ``test_real_name_with_rembgd_marker_*``
8. share outage -> ``test_share_outage_*`` (folder renamed away; read-only bind mount,
   skipped where mounting is not permitted), ``test_outbox_vanishing_*``

Defect 7 (polling CPU) is a benchmark (bench/polling_idle.py) and 9 (cache heal)
is covered in tests/test_faults.py.

Issue 20:

1. a lost or torn ledger record, a replaced photo -> ``test_lost_or_torn_ledger_*``,
   ``test_legacy_outputs_are_adopted_once_*`` (the stamps: tests/test_stamp.py)
2. an inbox deleted and re-created, replaced, remounted -> ``test_inbox_*_watched_again``
3. a file renamed while it is processed -> ``test_file_renamed_while_*``
4. ``cache verify --repair`` after a heal -> tests/test_cache_heal.py
5. this host's orphaned temps -> ``test_stale_temp_files_*``
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import encode, photo, write_config
from daemon.ledger import Ledger
from harness import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow

SUCCESS = ("exact", "pixel", "near", "miss")


# ------------------------------------------------------------------ helpers


def jpg(name: str, w: int, h: int) -> bytes:
    """A real photo (scikit-image sample), resized so each test photo has its own size."""
    return encode(np.asarray(Image.fromarray(photo(name)).resize((w, h))), "JPEG", quality=90)


A = ("astronaut", 120, 100)
B = ("coffee", 150, 90)
C = ("chelsea", 96, 128)
D = ("rocket", 110, 140)


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # complete, not just a header
        return im.size


def config(tmp_path: Path, models_dir: Path, **kw) -> Path:
    kw.setdefault("settle_s", 0.2)
    kw.setdefault("poll_interval_s", 0.2)
    return write_config(tmp_path, models_dir, **kw)


def done_for(d: Daemon, path: Path) -> list[dict]:
    """Finished processing of ``path`` (success or failure, never an intermediate retry)."""
    return [e for e in d.processed() if e.get("path") == str(path) and e.get("outcome") != "retry"]


def named(d: Daemon, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def replace_like_rsync(dest: Path, data: bytes, mtime: float) -> None:
    """rsync -a: a hidden temp beside the file, its mtime set to the source's, renamed over."""
    tmp = dest.with_name(f".{dest.name}.Xq7v2a")
    tmp.write_bytes(data)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, dest)


def replace_like_cp_p(dest: Path, data: bytes, mtime: float) -> None:
    """cp -p over an existing file: truncated and rewritten in place, then the old mtime set."""
    with open(dest, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)
    os.utime(dest, (mtime, mtime))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def sidecar(failed: Path, name: str) -> dict:
    return json.loads((failed / (name + ".error.json")).read_text())


def edit_config(cfg: Path, edit) -> None:
    data = yaml.safe_load(cfg.read_text())
    edit(data)
    cfg.write_text(yaml.safe_dump(data))


# ------------------------------------------- 1. replaced input, older mtime


def test_replaced_input_with_older_mtime_is_redone_live_and_across_restart(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    a, b, keep = inbox / "a.jpg", inbox / "b.jpg", inbox / "keep.jpg"
    with Daemon(cfg) as d:
        a.write_bytes(jpg(*A))
        b.write_bytes(jpg(*A))
        keep.write_bytes(jpg(*C))
        wait_for(lambda: len(done_for(d, a)) == 1 and len(done_for(d, b)) == 1
                 and len(done_for(d, keep)) == 1, timeout=30)
        assert size_of(outbox / "a.jpg.png") == A[1:]
        older = a.stat().st_mtime - 3600  # older than the source, and than the output

        replace_like_rsync(a, jpg(*B), older)  # a different photo, an hour older
        replace_like_cp_p(b, jpg(*B), older)
        wait_for(lambda: len(done_for(d, a)) >= 2 and len(done_for(d, b)) >= 2, timeout=30)
        wait_for(lambda: size_of(outbox / "a.jpg.png") == B[1:]
                 and size_of(outbox / "b.jpg.png") == B[1:], timeout=10)
        assert done_for(d, a)[-1]["outcome"] in SUCCESS
        assert len(done_for(d, keep)) == 1
        # cp -p sets the mtime after the close: b.jpg may be redone once more (an exact
        # hit); stop only once the ledger holds every file as it is now
        ledger = Ledger(outbox)
        wait_for(lambda: all(ledger.state(Path(p.name), p.stat()) == "done" for p in (a, b, keep)),
                 timeout=20)
        assert d.stop() == 0

    # replaced while the daemon is stopped: the catch-up scan must redo it (and only it)
    replace_like_cp_p(a, jpg(*D), older - 3600)
    with Daemon(cfg) as d2:
        started = named(d2, "started")[0]
        assert started["catch_up"] == 1, started  # a.jpg; b.jpg and keep.jpg are unchanged
        wait_for(lambda: done_for(d2, a), timeout=30)
        wait_for(lambda: size_of(outbox / "a.jpg.png") == D[1:], timeout=10)
        assert done_for(d2, a)[0]["outcome"] in SUCCESS
        d2.quiet()  # a wrongly queued file would be processed by now
        assert not done_for(d2, b) and not done_for(d2, keep)
        assert size_of(outbox / "keep.jpg.png") == C[1:]


def test_replaced_input_with_older_mtime_and_move_is_processed_not_just_moved(tmp_path,
                                                                              models_dir):
    inbox = tmp_path / "inbox"
    cfg = config(tmp_path, models_dir, watch=[{
        "inbox": str(inbox), "outbox": str(tmp_path / "outbox"), "after_success": "move"}])
    done_dir, out = tmp_path / "done", tmp_path / "outbox" / "a.jpg.png"
    a = inbox / "a.jpg"
    with Daemon(cfg) as d:
        a.write_bytes(jpg(*A))
        wait_for(lambda: (done_dir / "a.jpg").exists(), timeout=30)
        assert size_of(out) == A[1:]
        older = out.stat().st_mtime - 3600

        replace_like_rsync(a, jpg(*B), older)  # the same name again, a new photo, older mtime
        wait_for(lambda: len(done_for(d, a)) == 2 and not a.exists(), timeout=30)
        assert done_for(d, a)[-1]["outcome"] in SUCCESS, done_for(d, a)
        assert size_of(out) == B[1:]
        moved = sorted(p.read_bytes() for p in done_dir.iterdir())
        assert moved == sorted([jpg(*A), jpg(*B)])  # both kept, nothing overwritten


# ------------------------------- issue 20.1: a lost or torn ledger record


def stamp_of(path: Path) -> str | None:
    from daemon.imaging.stamp import read_stamp

    with open(path, "rb") as fh:
        return read_stamp(fh)


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lost_or_torn_ledger_never_makes_a_replaced_photo_done(tmp_path, models_dir):
    from daemon.ledger import LEDGER_DIR, record_name

    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    x, y, z = inbox / "x.jpg", inbox / "y.jpg", inbox / "z.jpg"
    four_days_ago = time.time() - 4 * 86400
    ledger = Ledger(outbox)
    with Daemon(cfg) as d:
        for f, photo_ in ((x, A), (y, A), (z, C)):
            f.write_bytes(jpg(*photo_))
        wait_for(lambda: all(done_for(d, f) for f in (x, y, z)), timeout=30)
        for f in (x, y, z):  # each output names its source by content
            assert stamp_of(outbox / (f.name + ".png")) == sha_of(f)
        shutil.rmtree(outbox / LEDGER_DIR)  # x's record lost...
        torn = outbox / record_name(Path("y.jpg"))
        torn.parent.mkdir(parents=True)
        torn.write_text("garbage")  # ...y's torn
        replace_like_rsync(x, jpg(*B), four_days_ago)  # another photo, a 4-day-old mtime
        replace_like_rsync(y, jpg(*B), four_days_ago)
        wait_for(lambda: len(done_for(d, x)) == 2 and len(done_for(d, y)) == 2, timeout=30)
        assert size_of(outbox / "x.jpg.png") == B[1:] and size_of(outbox / "y.jpg.png") == B[1:]
        for f in (x, y):  # the records hold the new content, never "legacy" with no sha256
            rec = wait_for(lambda: ledger.get(Path(f.name)), timeout=10)
            assert rec.sha256 == sha_of(f) and not rec.legacy, rec
        d.quiet()
        assert len(done_for(d, z)) == 1
        assert d.stop() == 0

    shutil.rmtree(outbox / LEDGER_DIR)  # lost while stopped; z replaced meanwhile
    replace_like_rsync(z, jpg(*D), four_days_ago)
    with Daemon(cfg) as d2:
        started = named(d2, "started")[0]
        assert started["catch_up"] == 3, started  # no records: the workers look at each
        wait_for(lambda: done_for(d2, z), timeout=30)
        assert size_of(outbox / "z.jpg.png") == D[1:]
        st = d2.quiet()
        assert st["counters"]["up_to_date"] == 2, st  # x and y: their outputs vouch for them
        assert not done_for(d2, x) and not done_for(d2, y)
        for f in (x, y, z):
            assert ledger.state(Path(f.name), f.stat()) == "done"
            assert ledger.get(Path(f.name)).sha256 == sha_of(f)


def test_legacy_outputs_are_adopted_once_on_upgrade_never_after(tmp_path, models_dir):
    from daemon import config as configmod
    from daemon.ledger import LEDGER_DIR, adopted_mark

    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    x, y = inbox / "x.jpg", inbox / "y.jpg"
    four_days_ago = time.time() - 4 * 86400
    for f, photo_ in ((x, A), (y, C)):  # what the version before stamps left: no stamp,
        f.write_bytes(jpg(*photo_))  # no ledger, outputs newer than their sources
        os.utime(f, (four_days_ago, four_days_ago))
        Image.new("RGBA", (8, 8)).save(outbox / (f.name + ".png"))
    with Daemon(cfg) as d:
        assert named(d, "started")[0]["catch_up"] == 0  # the upgrade: adopted by mtime
        assert Ledger(outbox).get(Path("x.jpg")).legacy
        state_dir = configmod.state_path(configmod.load(cfg)).parent
        assert adopted_mark(state_dir, outbox).is_file()  # the upgrade is over
        assert d.stop() == 0

    shutil.rmtree(outbox / LEDGER_DIR)  # after the upgrade, an mtime vouches for nothing:
    replace_like_rsync(x, jpg(*B), four_days_ago - 3600)  # x is another photo now
    with Daemon(cfg) as d2:
        assert named(d2, "started")[0]["catch_up"] == 2  # unstamped outputs: both redone
        wait_for(lambda: done_for(d2, x) and done_for(d2, y), timeout=30)
        assert size_of(outbox / "x.jpg.png") == B[1:] and size_of(outbox / "y.jpg.png") == C[1:]
        assert stamp_of(outbox / "x.jpg.png") == sha_of(x)


# ------------------------------------------------------ 2. incomplete files


def test_incomplete_files_wait_and_only_a_stuck_empty_file_fails(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir, incomplete_timeout_s=3)
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    data = jpg(*A)
    staged = tmp_path / "staged.jpg"  # the copy's source, outside the inbox
    staged.write_bytes(jpg(*B))

    def held_open():  # created, open and empty for 2 s, then written through the same handle
        with open(inbox / "held.jpg", "wb") as fh:
            time.sleep(2.0)
            fh.write(data)

    def touched_then_copied():
        (inbox / "touched.jpg").touch()
        time.sleep(2.0)
        shutil.copyfile(staged, inbox / "touched.jpg")

    def paused():  # half the photo, a pause far longer than settle_s, then the rest
        with open(inbox / "paused.jpg", "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            time.sleep(1.5)
            fh.write(data[len(data) // 2:])

    with Daemon(cfg) as d:
        t0 = time.monotonic()
        (inbox / "empty.jpg").touch()  # never grows
        writers = [threading.Thread(target=f) for f in (held_open, touched_then_copied, paused)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        names = ("held.jpg", "touched.jpg", "paused.jpg")
        wait_for(lambda: all(done_for(d, inbox / n) for n in names), timeout=30)
        wait_for(lambda: (failed / "empty.jpg.error.json").exists(), timeout=20)
        failed_after = time.monotonic() - t0
        d.quiet()  # a second processing of any of them would show by now
        for n in names:
            runs = done_for(d, inbox / n)
            assert [e["outcome"] for e in runs] in ([o] for o in SUCCESS), (n, runs)
            assert (outbox / (n + ".png")).exists()
        assert size_of(outbox / "held.jpg.png") == A[1:]
        assert size_of(outbox / "touched.jpg.png") == B[1:]
        assert sorted(p.name for p in failed.iterdir()) == ["empty.jpg", "empty.jpg.error.json"]
        assert sidecar(failed, "empty.jpg")["reason"] == "incomplete"
        assert failed_after >= 3.0  # waited incomplete_timeout_s, not failed at once
        assert named(d, "not_ready")  # the waits were logged

        # the same name, now a complete photo, is processed normally
        (inbox / "empty.jpg").write_bytes(jpg(*C))
        wait_for(lambda: (outbox / "empty.jpg.png").exists(), timeout=20)
        assert size_of(outbox / "empty.jpg.png") == C[1:]


# ------------------------------------------------------ 3. symlinked folders


def test_symlinked_subfolders_are_never_written_through(tmp_path, models_dir):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    failed, done_dir = tmp_path / "failed", tmp_path / "done"
    cfg = config(tmp_path, models_dir, watch=[{
        "inbox": str(inbox), "outbox": str(outbox), "after_success": "move"}])
    elsewhere = {k: tmp_path / "elsewhere" / k for k in ("out", "failed", "done")}
    for folder in (*elsewhere.values(), failed, done_dir, inbox / "sub", inbox / "sub2",
                   inbox / "sub3"):
        folder.mkdir(parents=True, exist_ok=True)
    (outbox / "sub").symlink_to(elsewhere["out"], target_is_directory=True)
    (failed / "sub2").symlink_to(elsewhere["failed"], target_is_directory=True)
    (done_dir / "sub3").symlink_to(elsewhere["done"], target_is_directory=True)

    with Daemon(cfg) as d:
        (inbox / "sub" / "x.jpg").write_bytes(jpg(*A))  # its output would go through outbox/sub
        (inbox / "sub2" / "bad.jpg").write_bytes(b"not an image at all " * 50)  # failed/sub2
        (inbox / "sub3" / "y.jpg").write_bytes(jpg(*B))  # its move would go through done/sub3
        wait_for(lambda: all((failed / f"{n}.error.json").exists()
                             for n in ("x.jpg", "bad.jpg", "y.jpg")), timeout=30)

        assert files_under(tmp_path / "elsewhere") == sorted(elsewhere.values())  # all empty
        x, bad, y = (sidecar(failed, n) for n in ("x.jpg", "bad.jpg", "y.jpg"))
        assert x["reason"] == "linked_folder" and str(outbox / "sub") in x["error"], x
        assert bad["reason"] == "unsupported" and str(failed / "sub2") in bad["error"], bad
        assert y["reason"] == "linked_folder" and str(done_dir / "sub3") in y["error"], y
        assert (failed / "x.jpg").read_bytes() == jpg(*A)  # the inputs, kept, at the top
        assert (failed / "y.jpg").read_bytes() == jpg(*B)
        assert (failed / "bad.jpg").exists()
        assert not any(list((inbox / s).iterdir()) for s in ("sub", "sub2", "sub3"))
        assert named(d, "failed_dir_link_refused")
        assert os.path.islink(outbox / "sub") and os.path.islink(failed / "sub2")


# ---------------------------------------------------------------- 4. reload


def test_reload_refuses_unprovisioned_model_and_restart_only_settings(tmp_path, models_dir):
    assert not (Path(models_dir) / "u2net_human_seg.onnx").exists()
    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    pristine = cfg.read_text()
    with Daemon(cfg) as d:
        edit_config(cfg, lambda c: c["watch"][0].update(options={"model": "u2net_human_seg"}))
        d.signal(signal.SIGHUP)
        refused = d.wait_log(lambda e: e.get("event") == "config_reload_refused")[0]
        assert "u2net_human_seg" in refused["error"], refused
        assert "rembgd models install --model u2net_human_seg" in refused["error"], refused
        (inbox / "a.jpg").write_bytes(jpg(*A))  # the old pair keeps working, on its model
        ev = wait_for(lambda: done_for(d, inbox / "a.jpg"), timeout=30)[0]
        assert ev["outcome"] in SUCCESS and ev["model"] == "u2netp"
        assert size_of(outbox / "a.jpg.png") == A[1:]

        cfg.write_text(pristine)
        edit_config(cfg, lambda c: c.update(workers=3))
        d.signal(signal.SIGHUP)
        refused = d.wait_log(lambda e: e.get("event") == "config_reload_refused", count=2)[1]
        assert "workers" in refused["error"] and "restart" in refused["error"], refused
        assert not named(d, "config_reloaded")

        cfg.write_text(pristine)
        edit_config(cfg, lambda c: c.update(threads=1, logging={"format": "json",
                                                                "level": "debug"}))
        d.signal(signal.SIGHUP)
        ok = d.wait_log(lambda e: e.get("event") == "config_reloaded")[0]
        assert ok["threads"] == 1 and ok["log_level"] == "debug"
        assert not [e for e in d.events() if e.get("level") == "debug"]
        # a write-close without a change: the intake finds it up to date, said at debug level
        os.close(os.open(inbox / "a.jpg", os.O_WRONLY))
        d.wait_log(lambda e: e.get("level") == "debug", timeout=20)
        (inbox / "b.jpg").write_bytes(jpg(*B))  # and it still works
        wait_for(lambda: done_for(d, inbox / "b.jpg"), timeout=30)
        assert d.proc.poll() is None
        assert d.stop() == 0


def test_reload_applies_threads_in_process(tmp_path, models_dir, shared_engines):
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    cfg_path = config(tmp_path, models_dir)  # threads: 2, as the shared engines
    svc = Supervisor(configmod.load(cfg_path))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    try:
        edit_config(cfg_path, lambda c: c.update(threads=1))
        assert svc.reload()
        assert svc.cfg.threads == 1
        assert svc.app.engines is not shared_engines and svc.app.engines.threads == 1
    finally:
        svc.stop_watching()
        svc.app.close()


# ------------------------------------------ issue 20.2: a re-created inbox


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_inbox_deleted_and_recreated_is_watched_again(tmp_path, models_dir, observer):
    cfg = config(tmp_path, models_dir, rescan_interval_s=0, observer=observer)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    with Daemon(cfg) as d:
        (inbox / "a.jpg").write_bytes(jpg(*A))
        wait_for(lambda: done_for(d, inbox / "a.jpg"), timeout=30)
        shutil.rmtree(inbox)
        ev = d.wait_log(lambda e: e.get("event") == "pair_standby", timeout=20)[0]
        assert f"inbox {inbox} is missing" in ev["reason"], ev
        st = wait_for(lambda: (s := d.status()).get("state") == "standby" and s, timeout=10)
        assert "inbox" in st["standby"][str(inbox)]["reason"], st  # by its key

        inbox.mkdir()  # rescan_interval_s: 0, so only a new watch or its catch-up finds these
        (inbox / "b.jpg").write_bytes(jpg(*B))
        ev = d.wait_log(lambda e: e.get("event") == "inbox_watched_again", timeout=20)[0]
        assert ev["change"] == "returned", ev
        d.wait_log(lambda e: e.get("event") == "pair_resumed", timeout=20)
        wait_for(lambda: done_for(d, inbox / "b.jpg"), timeout=30)
        (inbox / "c.jpg").write_bytes(jpg(*C))  # seen by the new watch
        wait_for(lambda: done_for(d, inbox / "c.jpg"), timeout=30)
        assert size_of(outbox / "b.jpg.png") == B[1:] and size_of(outbox / "c.jpg.png") == C[1:]
        wait_for(lambda: d.status().get("state") == "idle", timeout=10)
        for event in ("pair_standby", "pair_resumed", "inbox_watched_again"):
            assert len(named(d, event)) == 1, (event, named(d, event))  # logged once


def test_inbox_replaced_by_another_folder_is_watched_again(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir, rescan_interval_s=0)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    fresh = tmp_path / "inbox.new"
    fresh.mkdir()
    (fresh / "pre.jpg").write_bytes(jpg(*C))  # there before the swap: the catch-up's
    with Daemon(cfg) as d:
        (inbox / "a.jpg").write_bytes(jpg(*A))
        wait_for(lambda: done_for(d, inbox / "a.jpg"), timeout=30)
        inbox.rename(tmp_path / "inbox.old")  # the folder is swapped in one instant:
        fresh.rename(inbox)  # never missing at a tick, but another inode
        ev = d.wait_log(lambda e: e.get("event") == "inbox_watched_again", timeout=20)[0]
        assert ev["change"] == "replaced", ev
        wait_for(lambda: done_for(d, inbox / "pre.jpg"), timeout=30)
        (inbox / "b.jpg").write_bytes(jpg(*B))
        wait_for(lambda: done_for(d, inbox / "b.jpg"), timeout=30)
        assert size_of(outbox / "pre.jpg.png") == C[1:] and size_of(outbox / "b.jpg.png") == B[1:]
        assert len(named(d, "inbox_watched_again")) == 1


def test_inbox_remounted_is_watched_again(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir, rescan_interval_s=0)
    inbox, outbox, share = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "share"
    share.mkdir()
    (share / "on-share.jpg").write_bytes(jpg(*B))
    if os.geteuid() != 0 or _run("mount", "--bind", str(share), str(share)).returncode:
        pytest.skip("a bind mount needs root and mount permission")
    _run("umount", "-l", str(share))
    mounted = False
    try:
        with Daemon(cfg) as d:
            assert _run("mount", "--bind", str(share), str(inbox)).returncode == 0  # a remount
            mounted = True
            ev = d.wait_log(lambda e: e.get("event") == "inbox_watched_again", timeout=20)[0]
            assert ev["change"] == "replaced", ev
            wait_for(lambda: done_for(d, inbox / "on-share.jpg"), timeout=30)  # the catch-up
            (inbox / "later.jpg").write_bytes(jpg(*C))  # and the new watch
            wait_for(lambda: done_for(d, inbox / "later.jpg"), timeout=30)
            assert size_of(outbox / "on-share.jpg.png") == B[1:]
            assert size_of(outbox / "later.jpg.png") == C[1:]
    finally:
        if mounted:
            _run("umount", "-l", str(inbox))


# ------------------------------------------ issue 20.3: renamed mid-job


@pytest.mark.parametrize("outputs", ["legacy", "deliverables"])
def test_file_renamed_while_processed_leaves_no_output_under_its_old_name(
        tmp_path, models_dir, shared_engines, outputs):
    """The rename lands inside the job (after the read, before the writes): in-process, as
    a real process cannot be made to hit that instant; the watcher's half is below."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.intake import WorkItem
    from daemon.service.supervisor import Supervisor

    extra = {} if outputs == "legacy" else {"watch": [{
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "outputs": [{"name": "master", "format": "tiff"}, {"name": "web", "format": "webp"}]}]}
    svc = Supervisor(configmod.load(config(tmp_path, models_dir, **extra)))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    inbox, outbox = svc.cfg.watch[0].inbox, svc.cfg.watch[0].outbox
    ren, renamed = inbox / "ren.jpg", inbox / "renamed.jpg"
    ren.write_bytes(jpg(*A))
    render = svc.app.pipeline.render

    def render_then_rename(*args, **kw):
        rendered = render(*args, **kw)
        ren.rename(renamed)  # the studio renames it while it is being processed
        return rendered

    svc.app.pipeline.render = render_then_rename
    try:
        assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, ren)) == "withdrawn"
        svc.app.pipeline.render = render
        assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, renamed)) in SUCCESS
    finally:
        svc.app.close()
    live = sorted(p.relative_to(outbox).as_posix() for p in outbox.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and ".rembgd-" not in str(p))
    assert live == (["renamed.jpg.png"] if outputs == "legacy" else
                    ["master/renamed.jpg.tif", "web/renamed.jpg.webp"]), live
    ledger = Ledger(outbox)
    assert ledger.get(Path("ren.jpg")) is None  # the ledger knows no processed ren.jpg
    assert ledger.state(Path("renamed.jpg"), renamed.stat()) == "done"


def test_file_renamed_while_a_daemon_processes_it(tmp_path, models_dir):
    """The same on a real daemon: renamed as soon as the daemon has read the file (inotify
    tells), while it infers and encodes a 12 MP photo (about a second)."""
    from watchdog.events import FileClosedNoWriteEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    staged = tmp_path / "ren.jpg"
    staged.write_bytes(jpg("astronaut", 4000, 3000))
    read = threading.Event()

    class Reads(FileSystemEventHandler):
        def on_any_event(self, event):
            if isinstance(event, FileClosedNoWriteEvent) and event.src_path.endswith("ren.jpg"):
                read.set()

    observer = Observer()
    observer.schedule(Reads(), str(inbox))
    observer.start()
    try:
        with Daemon(cfg) as d:
            os.rename(staged, inbox / "ren.jpg")
            assert read.wait(30)  # the job read it: now it infers, encodes, writes
            os.rename(inbox / "ren.jpg", inbox / "renamed.jpg")
            ev = wait_for(lambda: done_for(d, inbox / "ren.jpg"), timeout=60)[0]
            assert ev["outcome"] == "withdrawn", ev
            wait_for(lambda: done_for(d, inbox / "renamed.jpg"), timeout=60)
            d.quiet()
    finally:
        observer.stop()
        observer.join()
    assert sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".")) == \
        ["renamed.jpg.png"]
    assert size_of(outbox / "renamed.jpg.png") == (4000, 3000)
    assert Ledger(outbox).get(Path("ren.jpg")) is None


# ------------------------------------------------------ 5, 6. temp names


def test_stale_temp_files_are_removed_at_start_fresh_ones_kept(tmp_path, models_dir):
    from daemon.fsutil import temp_name

    cfg = config(tmp_path, models_dir)
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    (outbox / "sub").mkdir(parents=True)
    failed.mkdir()
    old = time.time() - 20 * 60
    stale = [outbox / temp_name("a.jpg.png"), outbox / "sub" / temp_name("b.jpg.png"),
             failed / temp_name("c.jpg")]
    fresh = outbox / temp_name("d.jpg.png")  # this test process is alive: a live writer
    other_host = outbox / ".f.jpg.png.rembgd-tmp.0badc0de-1-0123abcd"  # may still be writing
    studio = outbox / "e.rembgd-final.jpg.png"  # a studio's name, not a temp
    for p in (*stale, fresh, other_host, studio):
        p.write_bytes(os.urandom(64 * 1024))
    for p in (*stale, studio):
        os.utime(p, (old, old))
    # a writer of this host killed mid-write a moment ago: its temp is fresh, its pid gone
    subprocess.run([sys.executable, "-c", "import sys; from daemon.fsutil import temp_name; "
                    "open(sys.argv[1] + '/' + temp_name('k.jpg.png'), 'wb').write(b'x' * 999)",
                    str(outbox / "sub")], check=True, cwd=ROOT)
    orphans = [p for p in (outbox / "sub").iterdir() if p.name.startswith(".k.jpg.png")]
    assert len(orphans) == 1

    with Daemon(cfg) as d:
        assert not any(p.exists() for p in stale + orphans)
        assert fresh.exists() and other_host.exists() and studio.exists()
        logged = named(d, "stale_temps_removed")
        assert sum(e["count"] for e in logged) == len(stale) + 1, logged


def test_real_name_with_rembgd_marker_is_processed(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    src = tmp_path / "inbox" / "photo.rembgd-final.jpg"
    with Daemon(cfg) as d:
        src.write_bytes(jpg(*A))
        ev = wait_for(lambda: done_for(d, src), timeout=30)[0]
        assert ev["outcome"] in SUCCESS
        assert size_of(tmp_path / "outbox" / "photo.rembgd-final.jpg.png") == A[1:]


# ----------------------------------------------------------- 8. share outage


def _outage_then_recovery(d: Daemon, tmp_path: Path, break_it, mend_it, names: list[str],
                          check_during=lambda: None) -> None:
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    break_it()
    for i, n in enumerate(names):
        (inbox / n).write_bytes(jpg(*(A, B, C)[i % 3]))
    ev = d.wait_log(lambda e: e.get("event") == "pair_standby", timeout=20)[0]
    assert "outbox" in ev["reason"], ev
    st = wait_for(lambda: (s := d.status()).get("state") == "standby" and s, timeout=10)
    assert "outbox" in st["standby"][str(inbox)]["reason"], st  # by its key
    check_during()
    # every file reached a worker and was held while the share is out
    wait_for(lambda: d.status().get("counters", {}).get("standby_waits", 0) >= len(names),
             timeout=20)
    check_during()
    assert not done_for(d, inbox / names[0])
    mend_it()
    d.wait_log(lambda e: e.get("event") == "pair_resumed", timeout=30)
    # the backoff is the pair's: every waiting file resumes with the probe that finds the
    # share working, none left behind on a longer per-file backoff (up to 60 s)
    wait_for(lambda: all(done_for(d, inbox / n) for n in names), timeout=20)
    for n in names:
        assert [e["outcome"] for e in done_for(d, inbox / n)][0] in SUCCESS
        assert (outbox / (n + ".png")).exists()
    assert not failed.exists() or not any(failed.iterdir())
    assert len(named(d, "pair_standby")) == 1  # logged once
    wait_for(lambda: d.status().get("state") in ("idle", "busy"), timeout=10)


def test_share_outage_outbox_renamed_away_means_standby(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    outbox, away = tmp_path / "outbox", tmp_path / "outbox.unmounted"

    def not_recreated():  # never silently re-created on the local disk
        assert not outbox.exists(), sorted(outbox.rglob("*"))

    with Daemon(cfg) as d:
        _outage_then_recovery(d, tmp_path, lambda: outbox.rename(away),
                              lambda: away.rename(outbox), [f"p{i}.jpg" for i in range(6)],
                              not_recreated)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def test_share_outage_read_only_outbox_means_standby(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    outbox, scratch = tmp_path / "outbox", tmp_path / "scratch"
    scratch.mkdir()
    if os.geteuid() != 0 or _run("mount", "--bind", str(scratch), str(scratch)).returncode:
        pytest.skip("a read-only bind mount needs root and mount permission")
    ro = _run("mount", "-o", "remount,bind,ro", str(scratch)).returncode == 0
    _run("umount", "-l", str(scratch))
    if not ro:
        pytest.skip("remounting read-only is not permitted here")
    mounted = False

    def break_it():  # the NAS hiccup: the outbox turns read-only under the running daemon
        nonlocal mounted
        assert _run("mount", "--bind", str(outbox), str(outbox)).returncode == 0
        mounted = True
        assert _run("mount", "-o", "remount,bind,ro", str(outbox)).returncode == 0

    def mend():
        nonlocal mounted
        assert _run("umount", str(outbox)).returncode == 0
        mounted = False

    try:
        with Daemon(cfg) as d:
            _outage_then_recovery(d, tmp_path, break_it, mend, [f"r{i}.jpg" for i in range(4)])
    finally:
        if mounted:
            _run("umount", "-l", str(outbox))


@pytest.mark.parametrize("cache", ["sqlite", "disabled"])
def test_outbox_vanishing_right_after_the_check_is_not_recreated(tmp_path, models_dir,
                                                                  shared_engines, cache):
    """The race the standby check cannot close: the share goes between the check and the
    writes. In-process, since a real process cannot be made to hit that instant."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.intake import WorkItem
    from daemon.service.supervisor import Supervisor

    extra = {"cache": {"dir": str(tmp_path / "cache"), "enabled": False}} if cache == "disabled" \
        else {}
    svc = Supervisor(configmod.load(config(tmp_path, models_dir, **extra)))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    try:
        outbox = svc.cfg.watch[0].outbox
        src = svc.cfg.watch[0].inbox / "late.jpg"
        src.write_bytes(jpg(*A))
        admit = svc.intake.admit

        def unmount_then_admit(*args):  # the standby check has passed; then:
            outbox.rename(tmp_path / "outbox.unmounted")
            return admit(*args)

        svc.intake.admit = unmount_then_admit
        assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, src)) == "standby"
        assert not outbox.exists()
        key = svc.cfg.watch[0].key
        assert svc.standby.active(key) and "outbox" in svc.standby.snapshot()[key]["reason"]
        assert src.exists() and not (tmp_path / "failed").exists()
    finally:
        svc.app.close()


# ------------------------------------------ issue 28.1: a TIFF deliverable, the ledger lost


def test_tiff_deliverable_with_the_ledger_lost_starts_and_is_vouched_or_redone(
        tmp_path, models_dir):
    from daemon.ledger import LEDGER_DIR

    cfg = config(tmp_path, models_dir, watch=[{
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "outputs": [{"name": "master", "format": "tiff"}]}])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    x, y = inbox / "x.jpg", inbox / "y.jpg"
    out_x, out_y = outbox / "master" / "x.jpg.tif", outbox / "master" / "y.jpg.tif"
    with Daemon(cfg) as d:
        x.write_bytes(jpg(*A))
        y.write_bytes(jpg(*C))
        wait_for(lambda: done_for(d, x) and done_for(d, y), timeout=30)
        assert stamp_of(out_x) == sha_of(x)
        # while running: the ledger lost and y replaced by another photo -> y is redone
        shutil.rmtree(outbox / LEDGER_DIR)
        replace_like_rsync(y, jpg(*B), time.time() - 4 * 86400)
        wait_for(lambda: len(done_for(d, y)) == 2, timeout=30)
        assert stamp_of(out_y) == sha_of(y) and size_of(out_y) == B[1:]
        assert d.stop() == 0
    shutil.rmtree(outbox / LEDGER_DIR)  # lost while stopped
    with Daemon(cfg) as d2:  # starts (the catch-up reads the TIFF stamps) ...
        st = d2.quiet()
        assert st["counters"]["up_to_date"] == 2, st  # ... and both stamps vouch
        assert not done_for(d2, x) and not done_for(d2, y)
        assert not [e for e in d2.events() if e.get("event") in ("worker_error",
                                                                  "unexpected_error")]


# ------------------------------------------ issue 28.2: the inbox flipped with no gap


def test_inbox_deleted_and_recreated_with_no_gap_is_watched_again_20_times(tmp_path, models_dir):
    """``rm -rf in && mkdir in``: the new folder often gets the inode just freed, so only
    the watch's own "deleted" event says the watch is dead. inotify, no rescans."""
    cfg = config(tmp_path, models_dir, rescan_interval_s=0, observer="inotify",
                 settle_s=0.1)
    inbox, outbox, staging = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "staging"
    staging.mkdir()
    photo_ = jpg(*A)
    with Daemon(cfg) as d:
        for i in range(20):
            before = len(named(d, "inbox_watched_again"))
            shutil.rmtree(inbox)
            inbox.mkdir()
            d.wait_log(lambda e: e.get("event") == "inbox_watched_again", timeout=20,
                       count=before + 1)
            # dropped after the re-arm: only the new watch can see it (no rescans)
            sub = inbox / "shoot" if i % 2 else inbox
            if i % 2:
                sub.mkdir()
            (staging / f"f{i}.jpg").write_bytes(photo_)
            os.rename(staging / f"f{i}.jpg", sub / f"f{i}.jpg")
            wait_for(lambda: done_for(d, sub / f"f{i}.jpg"), timeout=30)
            out = outbox / sub.relative_to(inbox) / f"f{i}.jpg.png"
            assert size_of(out) == A[1:], i
        assert d.proc.poll() is None


# ------------------------------------- issue 28, also: the standby backoff is cut on return


def test_a_file_held_on_standby_goes_at_once_when_its_inbox_returns(tmp_path, models_dir,
                                                                    shared_engines):
    """A file that reached a worker while its inbox was gone waits on the pair's standby
    backoff (up to a minute); the inbox coming back makes it due at once. In-process, on
    a frozen clock: nothing becomes due by waiting."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.intake import WorkItem
    from daemon.service.supervisor import Supervisor

    svc = Supervisor(configmod.load(config(tmp_path, models_dir, rescan_interval_s=0)))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    svc.scheduler.clock = lambda: 1000.0  # frozen: only a wake makes the wait due
    inbox, away = svc.cfg.watch[0].inbox, tmp_path / "inbox.unmounted"
    src = inbox / "a.jpg"
    src.write_bytes(jpg(*A))
    svc._start_watching()
    try:
        inbox.rename(away)  # the share goes as the file reaches a worker
        svc._follow_inboxes()
        assert svc.standby.active(svc.cfg.watch[0].key)
        assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, src)) == "standby"
        assert svc.scheduler.run_due() == 0 and svc.workers.queue.empty()  # waiting
        away.rename(inbox)  # back
        svc._follow_inboxes()
        assert not svc.standby.active(svc.cfg.watch[0].key)
        assert svc.scheduler.run_due() == 1  # the wait was cut, not run out
        item = svc.workers.queue.get_nowait()
        assert item.path == src and svc.workers.queue.empty()  # once, not twice
        assert svc.intake.process(item) in SUCCESS
        assert size_of(tmp_path / "outbox" / "a.jpg.png") == A[1:]
    finally:
        svc.stop_watching()
        svc.app.close()


# ------------------------------------------ issue 28.3: every written folder is swept


def test_orphaned_temps_are_swept_in_every_folder_rembgd_writes(tmp_path, models_dir):
    """outbox, failed/, done/ and review/ (the pair's ``written_folders``): this host's
    orphans (their writer's pid is gone) at once, another host's by age."""
    from daemon import config as configmod
    from daemon.service.housekeeping import sweep_temps

    cfg = configmod.load(config(tmp_path, models_dir, watch=[{
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "after_success": "move", "review": {"min_confidence": 0.9}}]))
    pair = cfg.watch[0]
    folders = pair.written_folders()
    assert set(folders) == {"outbox", "failed_dir", "done_dir", "review.dir"}
    assert folders["review.dir"] == tmp_path / "review"
    old = time.time() - 20 * 60
    planted = {}
    for key, folder in folders.items():
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", "import sys; from daemon.fsutil import temp_name; "
                        "open(sys.argv[1] + '/' + temp_name('r.jpg.png'), 'wb').write(b'x')",
                        str(folder / "sub")], check=True, cwd=ROOT)  # its pid is gone now
        other = folder / ".o.jpg.png.rembgd-tmp.0badc0de-1-0123abcd"  # another host's
        other.write_bytes(b"y")
        os.utime(other, (old, old))
        fresh_other = folder / ".p.jpg.png.rembgd-tmp.0badc0de-1-4567abcd"  # may be writing
        fresh_other.write_bytes(b"z")
        planted[key] = ([p for p in (folder / "sub").iterdir()] + [other], fresh_other)
    sweep_temps(pair)
    for key, (orphans, fresh_other) in planted.items():
        assert len(orphans) == 2 and not any(p.exists() for p in orphans), key
        assert fresh_other.exists(), key
